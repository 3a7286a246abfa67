"""Segmenter model, its architecture spec and its checkpoint files."""

from segcompress.models.segmenter import Attention, MaskTransformer, Segmenter, build_segmenter, unfused_attention
from segcompress.models.spec import BlockDims, SegmenterSpec, spec_from_timm

__all__ = [
    "Attention", "BlockDims", "MaskTransformer", "Segmenter", "SegmenterSpec", "build_segmenter", "spec_from_timm",
    "unfused_attention",
]
