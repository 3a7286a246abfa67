"""The tiny Segmenter the token-method tests (ToMe, CTS, ALGM) run on."""

from __future__ import annotations

import torch

from segcompress.models import Segmenter, SegmenterSpec, build_segmenter


def tiny_spec(img_size: list[int], patch_size: int, depth: int, **kw) -> SegmenterSpec:
    """5 classes, width 32, 2 heads, no dropout or drop-path; ``kw`` overrides any field."""
    base = dict(num_classes=5, img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=2,
                drop_path_rate=0.0, decoder_dropout=0.0)
    base.update(kw)
    return SegmenterSpec(**base)


def tiny_model(spec: SegmenterSpec, seed: int = 0) -> Segmenter:
    """The model ``spec`` builds after ``torch.manual_seed(seed)``, in eval mode."""
    torch.manual_seed(seed)
    return build_segmenter(spec).eval()
