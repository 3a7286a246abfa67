"""DToP, dynamic token pruning (Tang et al., ICCV 2023), adapted to Segmenter: auxiliary heads
after some blocks let confident tokens exit with their prediction.

Knob: ``threshold`` (exit confidence) and ``policy_file`` (the trained heads, ``segcompress policy
--method dtop``; null = untrained heads), plus the settings below. The algorithm and the adaptation's
choices: :mod:`segcompress.tokens.dtop`; the heads' training: :mod:`segcompress.tokens.dtop_train`.
The cost depends on the image (tokens exit per image), so the threshold is bisected on calibration
images like ALGM's τ, and every evaluated condition measures its own GFLOPs. The heads always run,
so DToP at threshold 1 costs more than the dense model, and the reference split cannot go much
below half the dense FLOPs: a lower target is reported as not reached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segcompress.methods import Method, Settings


@dataclass(frozen=True)
class DToPSettings(Settings):
    """DToP's settings (``methods.dtop``).

    Args:
        split: 1-based blocks after which a head runs (each may let tokens exit); null = the
            reference's, [6, 8] of 12 blocks, [8, 16] of 24 (other depths: ``reference_split``).
        keep_per_class: the most confident exiting tokens per class that stay (reference: 5).
        head_dim: head width C; null = E // 2 (reference).
        head_layers: decoder layers per head (reference: 3).
        head_dropout: dropout in the heads while they train (reference: 0.1).
        aux_weight: weight of the heads' losses when the model is fine-tuned with DToP attached
            (reference: 1.0).
        policy: training of the heads on the dense model, once per dense model (``segcompress
            policy --method dtop``'s recipe: iters, batch_size, lr, min_lr, weight_decay,
            warmup_iters, loss_stride, log_every, num_workers); keys left out take its defaults.
    """

    split: list[int] | None = None
    keep_per_class: int = 5
    head_dim: int | None = None
    head_layers: int = 3
    head_dropout: float = 0.1
    aux_weight: float = 1.0
    policy: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.require([
            (self.keep_per_class >= 0, "keep_per_class", ">= 0"),
            (self.head_dim is None or self.head_dim >= 1, "head_dim", ">= 1 or null"),
            (self.head_layers >= 1, "head_layers", ">= 1"),
            (0 <= self.head_dropout < 1, "head_dropout", "in [0, 1)"),
            (self.aux_weight >= 0, "aux_weight", ">= 0"),
        ], show_value=True)


#: ``segcompress policy --method dtop``'s recipe (phase A, :mod:`segcompress.tokens.dtop_train`):
#: the reference's optimiser (AdamW, weight decay 0.01, the heads' lr 2e-5 × 10, 1500 warm-up
#: iterations, poly 0.9), batch 16, the length of its pruning phase
POLICY_RECIPE: dict[str, Any] = {
    "iters": 40000, "batch_size": 16, "lr": 2e-4, "min_lr": 0.0, "weight_decay": 0.01, "warmup_iters": 1500,
    "loss_stride": 1, "log_every": 50, "num_workers": 0,
}
POLICY_OPTIONS: tuple[str, ...] = ()
#: the settings the trained heads depend on (a change retrains them)
POLICY_SETTINGS = ("policy", "split", "head_dim", "head_layers", "head_dropout")

METHOD = Method("dtop", "DToP", "token", settings=DToPSettings, knob_keys=frozenset({"threshold", "policy_file"}),
                matched=True, input_dependent=True, needs_policy=True, policy_trains=True)


def config(settings: DToPSettings, threshold: float = 1.0) -> Any:
    from segcompress.tokens.dtop import DToPConfig

    return DToPConfig(threshold=float(threshold), split=settings.split, keep_per_class=settings.keep_per_class,
                      head_dim=settings.head_dim, head_layers=settings.head_layers,
                      head_dropout=settings.head_dropout, aux_weight=settings.aux_weight)


def build(model: Any, knob: dict[str, Any]) -> Any:
    """DToP at ``threshold`` with the heads of ``policy_file``; without one, untrained heads drawn
    from a fixed seed (every build the same; for FLOPs and speed only)."""
    import torch

    from segcompress.tokens.dtop import DToP, load_heads

    settings, rest = METHOD.split_knob(knob)
    if "threshold" not in rest:
        raise ValueError("dtop knob needs 'threshold' (exit confidence; 1 = no token exits)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method = DToP(model.spec, config(settings, rest["threshold"]))
    method.to(next(model.parameters()).device)
    if rest.get("policy_file") is not None:
        load_heads(method, model.spec, rest["policy_file"])
    return method.eval()


def cost(spec: Any, knob: dict[str, Any], model: Any = None, images: Any = None) -> Any:
    """Mean and std of the GFLOPs over ``images`` (each image at batch 1, heads included)."""
    from segcompress.tokens.dtop import dtop_cost

    return dtop_cost(model, build(model, knob), images)


def solve(problem: Any, max_iter: int = 30) -> Any:
    """Bisect the threshold in [0, 1] so that the mean GFLOPs over the calibration images meet the
    target (a lower threshold lets more tokens exit; :func:`~segcompress.tokens.match.bisect_cost`)."""
    from segcompress.flops import analytic_gmacs
    from segcompress.tokens.dtop import dtop_cost
    from segcompress.tokens.match import bisect_cost, finish

    settings = METHOD.parse_settings({k: v for k, v in problem.settings.items() if k != "policy_file"})
    base = {**settings.to_dict(), "policy_file": problem.settings.get("policy_file")}
    model, images = problem.model, problem.calibration()
    method = build(model, {**base, "threshold": 1.0})

    def cost(threshold: float) -> Any:
        method.config.threshold = threshold
        return dtop_cost(model, method, images)

    # every token but keep_per_class per class exits at the first head / none exits
    best_t, best, (lo, hi) = bisect_cost(cost, 0.0, 1.0, problem, max_iter)
    knob = {**base, "split": list(method.split), "threshold": best_t}
    return finish("dtop", knob, problem, best.mean, analytic_gmacs(problem.spec), (lo.mean, hi.mean), std=best.std,
                  extra={"calibration_images": len(best.per_image), "heads_trained": base["policy_file"] is not None})


def save_policy(method: Any, spec: Any, path: Any, metadata: dict[str, Any]) -> None:
    """Write the heads of an attached DToP (after fine-tuning with it) to ``path``."""
    from segcompress.tokens.dtop import save_heads

    save_heads(method, spec, path, metadata)


def train_policy(model_path: Any, batches: Any, recipe: dict[str, Any], settings: DToPSettings, *, seed: int,
                 device: Any, on_step: Any, out: Any, metadata: dict[str, Any], options: dict[str, Any]) -> str:
    """Phase A: train the heads on the frozen dense model at ``model_path`` (``batches()``: the
    training batches) and write them to ``out``; returns a one-line description for the log."""
    from segcompress.models.checkpoint import load_model
    from segcompress.tokens.dtop import DToP, save_heads
    from segcompress.tokens.dtop_train import heads_recipe, train_heads

    if model_path is None:
        raise ValueError("dtop trains its heads on the dense model: give --model")
    model = load_model(model_path)
    method = DToP(model.spec, config(settings))
    losses = train_heads(model, method, batches(), heads_recipe(recipe), seed=seed, device=device, on_step=on_step)
    save_heads(method.cpu(), model.spec, out, {**metadata, "final_loss": losses[-1] if losses else None})
    return f"DToP heads after blocks {method.split}"
