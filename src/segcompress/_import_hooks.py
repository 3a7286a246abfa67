"""Import fixes for two packages whose binary parts are missing on a CPU-only install.

Loaded at interpreter start-up from ``segcompress_import_hooks.pth`` in site-packages (written by
``python -m segcompress._import_hooks install``, which ``make venv`` runs). Each fix acts only
when the binary it replaces is missing, so on a CUDA machine with a matching torchvision and a
full mmcv both are no-ops.

* torchvision: PyPI only ships CUDA builds of torchvision 0.28. With CPU torch its ``_C`` library
  fails to load, and ``torchvision/_meta_registrations.py`` then calls ``register_fake`` on the
  ``torchvision::nms`` and ``torchvision::qnms`` ops that were never defined, so ``import
  torchvision`` (and with it timm, torchmetrics and mmseg.models) raises. The fix defines those two
  op schemas just before that module runs. The compiled ops stay unusable (they raise when called);
  nothing in segcompress calls them.
* mmcv-lite: ``mmcv.ops`` loads the compiled ``mmcv._ext`` for every op, and mmseg imports
  ``mmcv.ops.point_sample`` at module level. When ``mmcv._ext`` is missing, ``mmcv.ops`` becomes a
  small module with a pure-PyTorch ``point_sample``; every other op raises NotImplementedError.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
import types
from pathlib import Path

_PTH_NAME = "segcompress_import_hooks.pth"
_PTH_LINE = (
    "import sys; exec('try:\\n import segcompress._import_hooks as _h; _h.activate()\\n"
    "except ImportError:\\n pass')\n"
)

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library = None  # keeps the torch.library.Library defining the schemas alive


def _define_torchvision_schemas() -> None:
    global _torchvision_library
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops() or _torchvision_library is not None:
        return
    _torchvision_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _torchvision_library.define(schema)


def _mmcv_has_ext() -> bool:
    return importlib.util.find_spec("mmcv._ext") is not None


def _point_sample(input, points, align_corners: bool = False, **kwargs):
    """Pure-PyTorch ``mmcv.ops.point_sample``: bilinear sampling at normalised [0, 1] points."""
    import torch.nn.functional as F

    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)
    output = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return output.squeeze(3) if add_dim else output


class _MissingOpsModule(types.ModuleType):
    """Stand-in for ``mmcv.ops`` without compiled extensions."""

    def __init__(self) -> None:
        super().__init__("mmcv.ops")
        self.point_sample = _point_sample
        self.__file__ = __file__
        self.__path__ = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def _unavailable(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv.ops.{name} needs the compiled mmcv; this environment has mmcv-lite "
                "(install full mmcv to use it)"
            )

        return _unavailable


class _AfterImportLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, before) -> None:
        self._loader, self._before = loader, before

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._before()
        self._loader.exec_module(module)


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _MissingOpsModule()

    def exec_module(self, module) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision._meta_registrations":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _AfterImportLoader(spec.loader, _define_torchvision_schemas)
            return spec
        if fullname == "mmcv.ops" and not _mmcv_has_ext():
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def activate() -> None:
    """Install the finder (idempotent). Called from the .pth file at start-up."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install(site_packages: Path | None = None) -> Path:
    """Write the .pth file into this interpreter's site-packages and return its path."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / _PTH_NAME
    target.write_text(_PTH_LINE)
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m segcompress._import_hooks install")
    print(f"wrote {install()}")
