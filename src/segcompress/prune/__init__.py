"""NViT-style global structural pruning of the Segmenter encoder to a FLOPs target.

``prune(model, dataset, target_gmacs, PruneConfig(...), seed=0).model`` is a physically smaller
Segmenter (fewer heads, narrower QK/V/MLP per block, a smaller embedding) that ``save_model``
writes and ``load_model`` rebuilds without this package. See ``docs/pruning.md``.
"""

from segcompress.prune.config import KINDS, PTM_PRUNE_SHARE, PruneConfig, prune_target_gmacs
from segcompress.prune.groups import Key, Masks, ParamSlice, PruneSpace
from segcompress.prune.masking import MaskHooks, masked_layer_norm
from segcompress.prune.nvit import Candidate, NViTPruner, PruneResult, prune
from segcompress.prune.saliency import Saliency
from segcompress.prune.shrink import kept_state, shrink

__all__ = [
    "KINDS", "PTM_PRUNE_SHARE", "Candidate", "Key", "MaskHooks", "Masks", "NViTPruner", "ParamSlice", "PruneConfig",
    "PruneResult", "PruneSpace", "Saliency", "kept_state", "masked_layer_norm", "prune", "prune_target_gmacs",
    "shrink",
]
