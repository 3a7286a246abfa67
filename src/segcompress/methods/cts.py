"""CTS (Lu et al., CVPR 2023): a policy network picks the 2×2 superpatches that share one token.

Knob: ``k`` (superpatches shared per image) and ``policy_file`` (the trained policy network,
``segcompress policy``; null = untrained), plus the settings below. The algorithm:
:mod:`segcompress.tokens.cts`. Matching is exact: every K from 0 to the number of superpatches is
scanned in closed form (N − 3K tokens everywhere, plus the policy net when it is counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segcompress.methods import Method, Settings


@dataclass(frozen=True)
class CTSSettings(Settings):
    """CTS's settings (``methods.cts``).

    Args:
        prop_attn: proportional attention (reference: off).
        decoder_on_merged: the decoder runs on the shared tokens (reference: on).
        include_policy_net: count the policy network in the GFLOPs (the paper does not say; the
            project does).
        policy: training of the policy network, once per dense model (``segcompress policy``'s
            options: iters, batch_size, lr, weight_decay, num_workers, log_every, pretrained);
            keys left out take that command's defaults.
    """

    prop_attn: bool = False
    decoder_on_merged: bool = True
    include_policy_net: bool = True
    policy: dict[str, Any] = field(default_factory=dict)


METHOD = Method("cts", "CTS", "token", settings=CTSSettings, knob_keys=frozenset({"k", "policy_file"}),
                matched=True, needs_policy=True)


def build(model: Any, knob: dict[str, Any]) -> Any:
    from segcompress.tokens.cts import CTS, load_policy

    settings, rest = METHOD.split_knob(knob)
    if "k" not in rest:
        raise ValueError("cts knob needs 'k' (shared superpatches per image)")
    path = rest.get("policy_file")
    policy = load_policy(path, map_location=next(model.parameters()).device)
    return CTS(int(rest["k"]), policy, None if path is None else str(path), prop_attn=settings.prop_attn,
               decoder_on_merged=settings.decoder_on_merged)


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    from segcompress.tokens.cost import Cost
    from segcompress.tokens.cts import cts_gmacs

    settings, _ = METHOD.split_knob(knob)
    return Cost(cts_gmacs(spec, {**knob, **settings.to_dict()}, settings.include_policy_net))


def solve(problem: Any) -> Any:
    """The K whose closed-form GFLOPs are nearest the target."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.cts import cts_gmacs, superpatch_grid
    from segcompress.tokens.match import finish

    spec, target = problem.spec, problem.target
    settings = METHOD.parse_settings({k: v for k, v in problem.settings.items() if k != "policy_file"})
    base = {**settings.to_dict(), "policy_file": problem.settings.get("policy_file")}
    sh, sw = superpatch_grid(spec.grid)
    dense = analytic_gmacs(spec)
    values = [cts_gmacs(spec, {"k": k, **base}, settings.include_policy_net) for k in range(sh * sw + 1)]
    k = min(range(len(values)), key=lambda i: (abs(values[i] - target), i))
    reach = (min(values[1:]), max(values[1:])) if len(values) > 1 else (dense, dense)
    return finish("cts", {"k": k, **base}, problem, values[k], dense, reach,
                  extra={"policy_net_counted": settings.include_policy_net})
