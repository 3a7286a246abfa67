"""Registry of compression methods that act on a trained model at inference time.

``apply_method(model, name, knob)`` returns the model with the method attached (the dense model
for ``dense``). Structural pruning is not here: a pruned model is its own checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

Applier = Callable[[nn.Module, dict[str, Any]], nn.Module]

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


for _name in ("tome", "algm", "cts"):
    register(_name)(_token_method(_name))
