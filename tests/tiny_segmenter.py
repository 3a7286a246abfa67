"""The tiny Segmenter every test builds: one spec helper and one model helper.

A module whose models differ from the defaults binds its own once, e.g.
``tiny_spec = functools.partial(tiny_spec, num_classes=7, **SEGMENTER_DROPOUT)``.
"""

from __future__ import annotations

from segcompress.models import Segmenter, SegmenterSpec, build_segmenter
from segcompress.seeding import seed_everything

#: Segmenter's training dropout (the ``SegmenterSpec`` defaults), for tiny specs that keep it.
SEGMENTER_DROPOUT = dict(drop_path_rate=0.1, decoder_dropout=0.1)


def tiny_spec(img_size: int | list[int] = 32, patch_size: int = 8, depth: int = 2, **kw) -> SegmenterSpec:
    """5 classes, width 32, 2 heads, no dropout or drop-path; ``kw`` overrides any field."""
    base = dict(num_classes=5, img_size=img_size, patch_size=patch_size, embed_dim=32, depth=depth, num_heads=2,
                drop_path_rate=0.0, decoder_dropout=0.0)
    base.update(kw)
    return SegmenterSpec(**base)


def tiny_model(spec: SegmenterSpec, seed: int = 0, train: bool = False) -> Segmenter:
    """The model ``spec`` builds after ``seed_everything(seed)``: as built if ``train``, else in eval mode."""
    seed_everything(seed)
    model = build_segmenter(spec)
    return model if train else model.eval()
