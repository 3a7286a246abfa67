#!/usr/bin/env bash
# Runs once inside the new conda environment (snakemake --sdm conda), from the repository root:
# the same installation steps as `make venv` (see Makefile).
set -euo pipefail
python -m pip install --quiet torch==2.13.0 setuptools==81.0.0
python -m pip install --quiet -c envs/constraints.txt -r envs/requirements.txt
python -m pip install --quiet --no-deps --no-build-isolation -e .
python -m segcompress._import_hooks install
python -m pip check
