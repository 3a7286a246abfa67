"""segcompress: token compression vs structural pruning for ViT segmentation, at matched FLOPs."""

__version__ = "0.1.0"
