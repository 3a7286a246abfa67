"""One base for the project's typed settings: a frozen dataclass that checks its fields against
their annotations and reads and writes plain JSON.

A subclass declares fields with defaults and keeps only its own value checks::

    @dataclass(frozen=True)
    class Recipe(Settings):
        what = "recipe"          # names the settings in messages ("recipe key 'lr' must be ...")
        lr: float = 1e-3

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.lr <= 0:
                raise ValueError(f"recipe key 'lr' must be > 0, got {self.lr!r}")

Every field is checked against its annotation when the object is built, before the subclass's
own ``__post_init__`` runs (also when that one forgets ``super().__post_init__()``):
``bool``, ``int`` (not a bool), ``float`` (an int is accepted and stored as a float; NaN and
infinities are refused), ``str``, ``list``/``tuple`` (either is accepted), ``dict``, ``Any`` and
unions such as ``X | None``; of a parameterised annotation (``list[int]``) only the outer type is
checked, and other annotations are not checked. :meth:`Settings.from_dict` builds from a mapping
(unknown keys refused by name, every error prefixed with where the mapping came from),
:meth:`Settings.to_dict` writes it back.

This module imports neither torch nor the rest of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

__all__ = ["Settings"]

_NAMES: dict[type, str] = {
    bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
    tuple: "a list", dict: "a mapping", type(None): "null",
}


def _fit(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Whether ``value`` fits the annotation ``hint``, the value to store (an int given for a
    float becomes a float) and what the annotation asks for, in words (for the message)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        wanted: list[str] = []
        for arg in typing.get_args(hint):
            ok, fitted, name = _fit(value, arg)
            if ok:
                return True, fitted, name
            if name not in wanted:
                wanted.append(name)
        return False, value, " or ".join(wanted)
    want = origin or hint
    if want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return False, value, "a finite number"
        return ok, float(value) if ok else value, _NAMES[float]
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool), value, _NAMES[int]
    if want in (list, tuple):
        return isinstance(value, (list, tuple)), value, _NAMES[want]
    if want in _NAMES:
        return isinstance(value, want), value, _NAMES[want]
    return True, value, "any value"  # Any, and annotations not checked


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(settings: Settings) -> None:
    """Check every field against its annotation; store ints given for floats as floats."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        if not f.init:
            continue
        value = getattr(settings, f.name)
        ok, fitted, wanted = _fit(value, hints[f.name])
        if not ok:
            raise ValueError(f"{settings.what} key {f.name!r} must be {wanted}, got {value!r}")
        if fitted is not value:
            object.__setattr__(settings, f.name, fitted)


@dataclass(frozen=True)
class Settings:
    """Base of typed settings: a frozen dataclass that reads and writes plain JSON.

    Subclasses add fields with defaults, name themselves in :attr:`what` and validate their
    values in ``__post_init__`` (after ``super().__post_init__()``), raising ``ValueError`` that
    names the key. The types of the fields are checked before that ``__post_init__`` runs.
    """

    #: how the settings are named in messages: ``"<what> key 'lr' must be a number, got 'x'"``
    what: ClassVar[str] = "settings"
    #: ``from_dict(None)`` gives the defaults (else ``None`` is refused as a non-mapping)
    accepts_none: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # Checked here only when no subclass defines __post_init__ (theirs check first, below).
        if type(self).__post_init__ is Settings.__post_init__:
            _check_fields(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make a subclass's own ``__post_init__`` check the field types first, once."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_fields", False):
            return

        @functools.wraps(own)
        def __post_init__(self: Settings) -> None:
            if type(self).__post_init__ is __post_init__:  # the outermost one checks
                _check_fields(self)
            own(self)

        __post_init__._checks_fields = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str | None = None) -> Self:
        """Build from a mapping; unknown keys and bad values are refused by name.

        Args:
            source: how the mapping is named in error messages, e.g. a file or an option
                (default: :attr:`what`).
        """
        source = cls.what if source is None else source
        if data is None and cls.accepts_none:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: must be a mapping of {cls.what} keys, got {type(data).__name__}")
        allowed = cls.keys()
        unknown = sorted(set(data) - set(allowed), key=str)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(map(str, unknown))} "
                             f"(allowed: {', '.join(allowed) or 'none'})")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def require(self, checks: Iterable[tuple[bool, str, str]], show_value: bool = False) -> None:
        """Raise ``ValueError`` at the first ``(ok, key, wanted)`` whose ``ok`` is false:
        ``"<what> key '<key>' must be <wanted>"`` (``, got <value>`` with ``show_value``)."""
        for ok, key, want in checks:
            if not ok:
                got = f", got {getattr(self, key)!r}" if show_value else ""
                raise ValueError(f"{self.what} key {key!r} must be {want}{got}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data (what :meth:`from_dict` reads back)."""
        return dataclasses.asdict(self)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The names of the fields, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)
