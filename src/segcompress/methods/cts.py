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
        policy: the policy network and its training, once per dense model (``segcompress
            policy``'s options: iters, batch_size, lr, weight_decay, num_workers, log_every,
            pretrained, channel_multiplier); keys left out take that command's defaults.
    """

    prop_attn: bool = False
    decoder_on_merged: bool = True
    include_policy_net: bool = True
    policy: dict[str, Any] = field(default_factory=dict)


#: ``segcompress policy --method cts``'s recipe (CTS: AdamW 5e-5, weight decay 1e-3, batch 8,
#: 50000 iterations) and its options
POLICY_RECIPE: dict[str, Any] = {
    "iters": 50000, "batch_size": 8, "lr": 5e-5, "weight_decay": 1e-3, "num_workers": 0, "log_every": 50,
    "pretrained": None, "channel_multiplier": 1.0,
}
POLICY_OPTIONS = ("border_ignore", "pretrained")
#: the settings a trained policy depends on (a change retrains it)
POLICY_SETTINGS = ("policy",)

METHOD = Method("cts", "CTS", "token", settings=CTSSettings, knob_keys=frozenset({"k", "policy_file"}),
                matched=True, needs_policy=True)


def given_multiplier(settings: CTSSettings) -> float | None:
    """The settings' ``policy.channel_multiplier``, None when they leave it out."""
    value = (settings.policy or {}).get("channel_multiplier")
    return None if value is None else float(value)


def channel_multiplier(settings: CTSSettings, policy_file: Any = None) -> float:
    """The policy net's channel multiplier: the policy file's when it exists (it was trained so;
    settings that name another are an error that says to retrain), else the settings' (default
    1.0: efficientnet_lite0)."""
    from pathlib import Path

    from segcompress.tokens.cts import channel_multiplier_of

    given = given_multiplier(settings)
    if policy_file is not None and Path(policy_file).is_file():
        return channel_multiplier_of(policy_file, given)
    return float(POLICY_RECIPE["channel_multiplier"]) if given is None else given


def build(model: Any, knob: dict[str, Any]) -> Any:
    from segcompress.tokens.cts import CTS, load_policy

    settings, rest = METHOD.split_knob(knob)
    if "k" not in rest:
        raise ValueError("cts knob needs 'k' (shared superpatches per image)")
    path = rest.get("policy_file")
    # the settings' multiplier, when they set one, must be the file's (else: retrain)
    policy = load_policy(path, map_location=next(model.parameters()).device,
                         channel_multiplier=given_multiplier(settings))
    return CTS(int(rest["k"]), policy, None if path is None else str(path), prop_attn=settings.prop_attn,
               decoder_on_merged=settings.decoder_on_merged)


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    from segcompress.tokens.cost import Cost
    from segcompress.tokens.cts import cts_gmacs

    settings, rest = METHOD.split_knob(knob)
    return Cost(cts_gmacs(spec, {**knob, **settings.to_dict()}, settings.include_policy_net,
                          channel_multiplier(settings, rest.get("policy_file"))))


def solve(problem: Any) -> Any:
    """The K whose closed-form GFLOPs are nearest the target."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.cts import cts_gmacs, policy_gmacs, policy_init_of, superpatch_grid, uniform_fraction_of
    from segcompress.tokens.match import finish

    spec, target = problem.spec, problem.target
    settings = METHOD.parse_settings({k: v for k, v in problem.settings.items() if k != "policy_file"})
    base = {**settings.to_dict(), "policy_file": problem.settings.get("policy_file")}
    sh, sw = superpatch_grid(spec.grid)
    dense = analytic_gmacs(spec)
    multiplier = channel_multiplier(settings, base["policy_file"])
    values = [cts_gmacs(spec, {"k": k, **base}, settings.include_policy_net, multiplier) for k in range(sh * sw + 1)]
    k = min(range(len(values)), key=lambda i: (abs(values[i] - target), i))
    reach = (min(values[1:]), max(values[1:])) if len(values) > 1 else (dense, dense)
    # K against the uniform share of the policy's training superpatches: above it, CTS must also
    # share regions that hold several classes
    return finish("cts", {"k": k, **base}, problem, values[k], dense, reach,
                  extra={"policy_net_counted": settings.include_policy_net, "shared_fraction": k / (sh * sw),
                         "uniform_fraction": uniform_fraction_of(base["policy_file"]),
                         "policy_init": policy_init_of(base["policy_file"]) if base["policy_file"] else None,
                         "policy_channel_multiplier": multiplier,
                         "policy_gflops": policy_gmacs(*spec.crop, spec.patch_size, multiplier)})


def train_policy(model_path: Any, batches: Any, recipe: dict[str, Any], settings: CTSSettings, *, seed: int,
                 device: Any, on_step: Any, out: Any, metadata: dict[str, Any], options: dict[str, Any]) -> str:
    """Train the policy net on the labels of ``batches()`` (the model at ``model_path`` only gave
    the crop and patch size) and write it to ``out``; returns a one-line description for the log."""
    from segcompress.tokens.cts import PolicyNet, policy_metadata, save_policy
    from segcompress.tokens.cts import train_policy as train

    pretrained = recipe["pretrained"] if options.get("pretrained") is None else options["pretrained"]
    if isinstance(pretrained, str) and pretrained.lower() in ("none", "null"):
        pretrained = None
    if pretrained is not None and not isinstance(pretrained, str):
        raise ValueError(f"methods.cts.policy / --recipe: 'pretrained' must be \"timm\", a file path or null, "
                         f"got {pretrained!r}")
    layout = options["layout"]
    border_ignore = options["border_ignore"] if options.get("border_ignore") is not None else layout == "ade20k"
    # first: a bad weights file or multiplier fails before any work
    policy = PolicyNet(pretrained=pretrained, channel_multiplier=float(recipe["channel_multiplier"]))
    run = train(policy, batches(), int(recipe["iters"]), patch_size=int(options["patch_size"]),
                border_ignore=border_ignore, lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]),
                device=device, on_step=on_step)
    meta = {k: metadata[k] for k in ("layout", "crop", "patch_size", "iters", "seed")}
    save_policy(policy.cpu(), out, policy_metadata(**meta, border_ignore=border_ignore,
                                                   final_loss=run.losses[-1] if run.losses else None,
                                                   uniform_fraction=run.uniform_fraction))
    seen = "" if run.uniform_fraction is None else f"; {run.uniform_fraction:.1%} of its training superpatches uniform"
    width = "" if policy.channel_multiplier == 1.0 else f", channels x{policy.channel_multiplier:g}"
    return f"CTS policy net, {policy.init} init{width}{seen}"
