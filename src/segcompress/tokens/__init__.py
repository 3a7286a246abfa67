"""Token reduction on the Segmenter encoder: ToMe, ALGM and CTS through one token state.

* :mod:`~segcompress.tokens.state`: :class:`TokenState` (features, sizes, O(N) patch → token map),
  :func:`merge_slots` (every reduction), unmerging by a gather.
* :mod:`~segcompress.tokens.tome`, :mod:`~segcompress.tokens.algm`, :mod:`~segcompress.tokens.cts`:
  the algorithms as pure functions.
* :mod:`~segcompress.tokens.patch`: the thin :class:`TokenMethod` modules a Segmenter runs.
* :mod:`~segcompress.tokens.cost`: closed-form GFLOPs per method and knob; knob matching.

Use ``segcompress.methods.apply_method(model, "tome", {"r": 16})`` to attach a method.
"""

from segcompress.tokens.patch import (
    ALGM, CTS, ToMe, TokenMethod, attach, method_from_knob, restored_features, restored_state,
)
from segcompress.tokens.state import TokenState, merge_slots, restore_grid

__all__ = [
    "ALGM", "CTS", "ToMe", "TokenMethod", "TokenState", "attach", "merge_slots", "method_from_knob",
    "restore_grid", "restored_features", "restored_state",
]
