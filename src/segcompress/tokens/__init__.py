"""Token reduction on the Segmenter encoder: ToMe, ALGM and CTS through one token state.

* :mod:`~segcompress.tokens.state`: :class:`TokenState` (features, sizes, O(N) patch → token map),
  :func:`merge_slots` (every reduction), unmerging by a gather.
* :mod:`~segcompress.tokens.tome`, :mod:`~segcompress.tokens.algm`, :mod:`~segcompress.tokens.cts`:
  the algorithms as pure functions, each with its thin :class:`TokenMethod` and its GFLOPs.
* :mod:`~segcompress.tokens.patch`: the :class:`TokenMethod` base a Segmenter runs.
* :mod:`~segcompress.tokens.cost`, :mod:`~segcompress.tokens.match`: the cost and matching types.

What a method is (its settings, cost and matching) is declared in ``segcompress.methods``.

Use ``segcompress.methods.apply_method(model, "tome", {"r": 16})`` to attach a method.
"""

from segcompress.tokens.algm import ALGM
from segcompress.tokens.cts import CTS
from segcompress.tokens.patch import TokenMethod, attach, restored_features, restored_state
from segcompress.tokens.state import TokenState, merge_slots, restore_grid
from segcompress.tokens.tome import ToMe

__all__ = [
    "ALGM", "CTS", "ToMe", "TokenMethod", "TokenState", "attach", "merge_slots", "restore_grid",
    "restored_features", "restored_state",
]
