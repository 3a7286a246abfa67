"""The study's methods: what each is (:data:`CATALOGUE`) and how it attaches to a model.

:data:`CATALOGUE` is the one list of the methods a study can name (``study.methods``): each
entry's name, display label, family and what it acts on. The workflow's method lists, ``segcompress
match``'s choices, the report's labels and drawing order, the input-dependent cost rule, which
variants train while pruning, and the config schema's enum (tested equal) all come from it.

``apply_method(model, name, knob)`` returns the model with an inference-time method attached
(the dense model for ``dense``). Structural pruning is not applied here: a pruned model is its
own checkpoint (``segcompress prune``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the catalogue is read by the workflow, which should not import torch for it
    from torch import nn


@dataclass(frozen=True)
class MethodInfo:
    """One method of the study.

    Args:
        name: the config's and the files' name.
        label: display name in tables and figures.
        family: ``reference`` (dense), ``token`` (acts on the tokens of the dense model),
            ``structural`` (a smaller model) or ``hybrid`` (a token method on a structurally
            pruned model).
        matched: its knob is solved for a FLOPs target by ``segcompress match``.
        pruned: it acts on a model pruned by ``segcompress prune`` (which trains while it prunes).
        input_dependent: its GFLOPs depend on the image (measured on each evaluated condition).
    """

    name: str
    label: str
    family: str
    matched: bool = False
    pruned: bool = False
    input_dependent: bool = False


#: Every method, in the reports' drawing order.
CATALOGUE: tuple[MethodInfo, ...] = (
    MethodInfo("dense", "Dense", "reference"),
    MethodInfo("nvit", "NViT", "structural", pruned=True),
    MethodInfo("tome", "ToMe", "token", matched=True),
    MethodInfo("algm", "ALGM", "token", matched=True, input_dependent=True),
    MethodInfo("cts", "CTS", "token", matched=True),  # its policy network: `segcompress policy`
    MethodInfo("nvit_tome", "NViT+ToMe", "hybrid", matched=True, pruned=True),
)
STUDY_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE)
TOKEN_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.family == "token")
MATCHED_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.matched)
PRUNED_METHODS: tuple[str, ...] = tuple(m.name for m in CATALOGUE if m.pruned)
#: Display labels: the methods' and the dense control's (the dense model trained as long as the
#: compressed ones, a reference variant rather than a method), in drawing order.
LABELS: dict[str, str] = {"dense": "Dense", "dense_control": "Dense control",
                          **{m.name: m.label for m in CATALOGUE}}


Applier = Callable[["nn.Module", dict[str, Any]], "nn.Module"]

_METHODS: dict[str, Applier] = {}


def register(name: str) -> Callable[[Applier], Applier]:
    def wrap(fn: Applier) -> Applier:
        _METHODS[name] = fn
        return fn

    return wrap


@register("dense")
def _dense(model: nn.Module, knob: dict[str, Any]) -> nn.Module:
    if knob:
        raise ValueError(f"method 'dense' takes no knob, got {knob}")
    if getattr(model, "token_method", None) is not None:
        model.token_method = None
    return model


def method_names() -> list[str]:
    return sorted(_METHODS)


def apply_method(model: nn.Module, name: str, knob: dict[str, Any] | None = None) -> nn.Module:
    """Attach method ``name`` with its ``knob`` (e.g. ``{"r": 8}`` for ToMe) to ``model``."""
    try:
        fn = _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(method_names())}") from None
    return fn(model, dict(knob or {}))


def _token_method(name: str) -> Applier:
    def apply(model: nn.Module, knob: dict[str, Any]) -> nn.Module:
        from segcompress.tokens.patch import attach, method_from_knob

        return attach(model, method_from_knob(name, knob, model))

    apply.__doc__ = f"Attach the {name} token method (knob: see segcompress.tokens.patch.method_from_knob)."
    return apply


for _name in TOKEN_METHODS:
    register(_name)(_token_method(_name))
