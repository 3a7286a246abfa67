"""NViT-style global structural pruning of the Segmenter encoder to a FLOPs target.

``prune(model, dataset, target_gmacs, PruneConfig(...), seed=0).model`` is a physically smaller
Segmenter (fewer heads, narrower QK/V/MLP per block, a smaller embedding) that ``save_model``
writes and ``load_model`` rebuilds without this package. See ``docs/pruning.md``.
"""

from segcompress.prune.config import KINDS, PTM_PRUNE_SHARE, PruneConfig, prune_target_gmacs

# The pruning machinery imports torch; the settings above do not (the method registry reads them).
_LAZY = {
    "Key": "groups", "Masks": "groups", "ParamSlice": "groups", "PruneSpace": "groups",
    "MaskHooks": "masking", "masked_layer_norm": "masking",
    "Candidate": "nvit", "NViTPruner": "nvit", "PruneResult": "nvit", "prune": "nvit",
    "Saliency": "saliency", "kept_state": "shrink", "shrink": "shrink",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KINDS", "PTM_PRUNE_SHARE", "Candidate", "Key", "MaskHooks", "Masks", "NViTPruner", "ParamSlice", "PruneConfig",
    "PruneResult", "PruneSpace", "Saliency", "kept_state", "masked_layer_norm", "prune", "prune_target_gmacs",
    "shrink",
]
