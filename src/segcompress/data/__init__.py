"""Datasets: synthetic scene generation and readers for the ADE20K and Cityscapes layouts."""
