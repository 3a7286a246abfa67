"""The registry of the study's methods: one module per method, found here by name.

A method is a module that declares ``METHOD``, a :class:`Method`: its name and display label, its
family, its typed settings (a :class:`Settings` dataclass: the config's ``methods.<name>`` entry,
the JSON handed to ``segcompress match``, and the settings part of every knob), and what it needs.
The module also holds the method's functions, which the registry imports only when they are used
(declarations are read by the workflow, which should not import torch for them):

* ``build(model, knob)``: the :class:`~segcompress.tokens.patch.TokenMethod` to attach (token
  methods);
* ``cost(spec, knob, model=None, images=None)``: its GFLOPs, a
  :class:`~segcompress.tokens.cost.Cost` (input-dependent methods measure ``images``);
* ``solve(problem)``: the knob that meets a FLOPs target, a :class:`~segcompress.tokens.match.Match`
  (methods whose knob is matched; the problem is a :class:`~segcompress.tokens.match.Problem`);
* ``train_policy(model_path, batches, recipe, settings, *, seed, device, on_step, out, metadata,
  options)`` with ``POLICY_RECIPE`` (its recipe's keys and defaults), ``POLICY_OPTIONS`` (the
  command's method-specific options it reads) and ``POLICY_SETTINGS`` (the settings a trained
  policy depends on): the policy a method decides with, trained on a dense model and kept in its
  own file (methods with ``needs_policy``; ``segcompress policy --method <name>``);
* ``prune(model, dataset, target_gmacs, settings, *, seed, collate_fn, device)`` and
  ``pruning_iters(settings)``: a structural method's smaller model (with a ``report()``) and the
  training iterations it spent on the way (``segcompress prune --method <name>``).

The built-in methods are the modules of this package (:data:`BUILTIN`, in the reports' drawing
order). A method outside the package joins the registry through the ``segcompress.methods`` entry
point group, or through ``SEGCOMPRESS_PLUGINS`` (comma-separated module names, or paths of ``.py``
files; the workflow sets it from the config's ``plugins``). ``apply_method(model, name, knob)``
attaches a method to a model (the dense model for ``dense``); structural pruning is not applied
here: a pruned model is its own checkpoint (``segcompress prune``).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segcompress.settings import Settings

if TYPE_CHECKING:
    from torch import nn

#: Built-in method modules (``segcompress.methods.<name>``), in the reports' drawing order.
BUILTIN: tuple[str, ...] = ("dense", "nvit", "depgraph", "tome", "tofu", "algm", "cts", "dtop", "nvit_tome")
ENTRY_POINT_GROUP = "segcompress.methods"
PLUGINS_ENV = "SEGCOMPRESS_PLUGINS"
FAMILIES: tuple[str, ...] = ("reference", "token", "structural", "hybrid")

#: The dense model trained for the compressed variants' budget: a reference variant, not a method.
DENSE_CONTROL = "dense_control"


@dataclass(frozen=True)
class NoSettings(Settings):
    """A method without settings."""


@dataclass(frozen=True)
class Method:
    """What the registry knows about a method without importing its code.

    Args:
        name: the config's, the files' and the command line's name.
        label: display name in tables and figures.
        family: ``reference`` (dense), ``token`` (acts on the tokens of the dense model),
            ``structural`` (a smaller model) or ``hybrid`` (a token method on a pruned model).
        settings: its settings dataclass (``methods.<name>`` in the config).
        knob_keys: keys a knob may hold besides the settings (what ``solve`` finds, e.g. ``r``).
        matched: its knob is solved for a FLOPs target by ``segcompress match``.
        pruned: it is, or acts on, a model pruned by ``segcompress prune``.
        input_dependent: its GFLOPs depend on the image (measured on each evaluated condition).
        needs_policy: its knob names a policy (``policy_file``) trained on the dense model by
            ``segcompress policy --method <name>`` (CTS's policy net, DToP's heads).
        policy_trains: its policy is part of the model while the model is fine-tuned with the
            method attached (DToP's heads; CTS's policy net stays frozen): fine-tuning writes the
            policy anew, with a knob that names it (``segcompress finetune --policy-out``).
        applies: the method a variant's checkpoint is evaluated with when it is not the method
            itself (``dense`` for a pruned model, ``tome`` for prune-then-merge).
        pruner: a hybrid's structural method, whose pruned model it acts on (``nvit`` for
            prune-then-merge); its settings then split the budget (``prune_fraction(target)``:
            the pruning stage's FLOPs fraction for an overall target).
        module: where ``build``, ``cost`` and ``solve`` live (set from the declaring module).
    """

    name: str
    label: str
    family: str
    settings: type[Settings] = NoSettings
    knob_keys: frozenset[str] = frozenset()
    matched: bool = False
    pruned: bool = False
    input_dependent: bool = False
    needs_policy: bool = False
    policy_trains: bool = False
    applies: str | None = None
    pruner: str | None = None
    module: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if (self.family == "hybrid") != (self.pruner is not None):
            raise ValueError(f"method {self.name!r}: a hybrid names its pruner (and only a hybrid does)")

    @property
    def token(self) -> bool:
        """Acts on the tokens of the dense model (``family == "token"``)."""
        return self.family == "token"

    @property
    def applied(self) -> str:
        """The method a variant of this one is evaluated with (:attr:`applies`, else itself)."""
        return self.applies or self.name

    def code(self) -> types.ModuleType:
        """The module that holds the method's functions."""
        return importlib.import_module(self.module)

    def parse_settings(self, data: dict[str, Any] | None) -> Settings:
        return self.settings.from_dict(data, f"methods.{self.name}")

    def split_knob(self, knob: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
        """A knob's settings (validated) and its other keys; unknown keys are refused by name."""
        setting_keys = set(self.settings.keys())
        unknown = sorted(set(knob) - setting_keys - set(self.knob_keys))
        if unknown:
            allowed = sorted(setting_keys | set(self.knob_keys))
            raise ValueError(f"unknown {self.name} knob key(s): {', '.join(unknown)} (allowed: {', '.join(allowed)})")
        settings = self.settings.from_dict({k: v for k, v in knob.items() if k in setting_keys}, f"{self.name} knob")
        return settings, {k: v for k, v in knob.items() if k not in setting_keys}


_registry: dict[str, Method] = {}
_loaded: str | None = None  # the SEGCOMPRESS_PLUGINS the registry was loaded with
_loading = False


def register(method: Method, module: str | None = None) -> Method:
    """Add ``method`` (its functions in ``module``, default ``method.module``); names are unique."""
    if module is not None:
        method = dataclasses.replace(method, module=module)
    if not method.module:
        raise ValueError(f"method {method.name!r}: no module holds its functions")
    known = _registry.get(method.name)
    if known is not None and known.module != method.module:
        raise ValueError(f"method {method.name!r} is defined twice: in {known.module} and in {method.module}")
    _registry[method.name] = method
    return method


def _import_plugin(ref: str) -> types.ModuleType:
    """A plug-in module by name, or by the path of its ``.py`` file."""
    if ref.endswith(".py") or os.sep in ref:
        path = Path(ref)
        if not path.is_file():
            raise ValueError(f"{PLUGINS_ENV}: {ref} is not a file (give a module name or a .py path)")
        name = f"segcompress_plugin_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]  # the next attempt runs it again and shows its own error
            raise
        return module
    return importlib.import_module(ref)


def _register_module(module: types.ModuleType, where: str) -> None:
    method = getattr(module, "METHOD", None)
    if not isinstance(method, Method):
        raise ValueError(f"{where}: module {module.__name__} declares no METHOD = segcompress.methods.Method(...)")
    register(method, module.__name__)


def _load() -> None:
    """Register the built-ins, the entry points and the plug-ins; again when SEGCOMPRESS_PLUGINS
    changed (a job forked from a process that loaded the registry under another environment)."""
    global _loaded, _loading
    plugins = os.environ.get(PLUGINS_ENV, "")
    if _loaded == plugins or _loading:  # loaded; or a plug-in looking methods up while it loads
        return
    _registry.clear()
    _loaded, _loading = None, True
    try:
        for name in BUILTIN:
            _register_module(importlib.import_module(f"{__name__}.{name}"), "built-in methods")
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _register_module(ep.load(), f"entry point {ep.name}")
        for ref in filter(None, (r.strip() for r in plugins.split(","))):
            _register_module(_import_plugin(ref), PLUGINS_ENV)
    except BaseException:
        _registry.clear()
        raise
    finally:
        _loading = False
    _loaded = plugins


def use_plugins(refs: list[str], folder: str | Path | None = None) -> None:
    """Register the plug-ins ``refs`` (module names or ``.py`` paths) here and in every process
    started from here (``SEGCOMPRESS_PLUGINS``); module names also resolve from ``folder`` (the
    project's, put on ``PYTHONPATH``)."""
    os.environ[PLUGINS_ENV] = ",".join(str(r) for r in refs)
    if folder is not None:
        paths = [str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    _load()


def reload() -> None:
    """Forget the registry, so that the next lookup reads the plug-ins again."""
    global _loaded
    _registry.clear()
    _loaded = None


def all_methods() -> tuple[Method, ...]:
    """Every registered method: the built-ins in drawing order, then the plug-ins."""
    _load()
    return tuple(_registry.values())


def names(**flags: Any) -> tuple[str, ...]:
    """Names of the methods whose attributes equal ``flags`` (e.g. ``names(matched=True)``)."""
    return tuple(m.name for m in all_methods() if all(getattr(m, k) == v for k, v in flags.items()))


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is refused with the known ones."""
    _load()
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_registry)}") from None


def labels() -> dict[str, str]:
    """Display labels in drawing order: the dense model, the dense control, then every method."""
    return {"dense": get("dense").label, DENSE_CONTROL: "Dense control", **{m.name: m.label for m in all_methods()}}


def apply_method(model: nn.Module, name: str, knob: dict[str, Any] | None = None) -> nn.Module:
    """Attach method ``name`` with its ``knob`` (e.g. ``{"r": 8}`` for ToMe) to ``model``.

    ``dense`` (and any method without a ``build``, e.g. a pruned model that runs as it is)
    removes an attached method and takes no knob.
    """
    from segcompress.tokens.patch import attach

    method = get(name)
    build = getattr(method.code(), "build", None)
    if build is None:
        if knob:
            raise ValueError(f"method {name!r} takes no knob, got {knob}")
        return attach(model, None)
    return attach(model, build(model, dict(knob or {})))


def method_cost(name: str, knob: dict[str, Any], spec: Any, model: nn.Module | None = None, images: Any = None) -> Any:
    """GFLOPs of method ``name`` at ``knob`` (a :class:`~segcompress.tokens.cost.Cost`); an
    input-dependent method needs the model and the images."""
    method = get(name)
    if method.input_dependent and (model is None or images is None):
        raise ValueError(f"{name}'s FLOPs depend on the input: give a model and images")
    cost = getattr(method.code(), "cost", None)
    if cost is None:
        raise ValueError(f"no closed-form FLOPs for method {name!r}")
    return cost(spec, knob, model=model, images=images)



def solve(name: str, spec: Any, target: float, settings: dict[str, Any] | None = None, *, model: nn.Module | None = None,
          images: Any = None, tolerance: float | None = None) -> Any:
    """The knob of method ``name`` that meets ``target`` GFLOPs on ``spec`` (a
    :class:`~segcompress.tokens.match.Match`); ``images``: calibration batches, or a function
    returning them, called only by input-dependent methods (which also need the ``model``)."""
    from segcompress.tokens.match import TOLERANCE, Problem

    method = get(name)
    solver = getattr(method.code(), "solve", None)
    if solver is None:
        raise ValueError(f"method {name!r}: its knob is not solved for a target")
    batches = images if images is None or callable(images) else (lambda: list(images))
    problem = Problem(spec, target, dict(settings or {}), TOLERANCE if tolerance is None else tolerance, model, batches)
    return solver(problem)
