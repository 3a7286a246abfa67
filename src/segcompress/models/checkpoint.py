"""Model checkpoints: weights as safetensors plus the architecture spec as JSON beside them.

``save_model(model, "models/x/dense.safetensors")`` writes ``dense.safetensors`` and
``dense.json``; ``load_model`` rebuilds the model from the JSON alone (no pruning or merging code
needed) and loads the weights. Nothing is unpickled. The weights also carry the spec in their
metadata (``SPEC_KEY``), so a JSON edited after saving, whose shapes may still fit (heads, norm
eps, decoder heads), is refused instead of silently changing the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from segcompress.io import write_safetensors
from segcompress.models.segmenter import Segmenter, build_segmenter
from segcompress.models.spec import SegmenterSpec


def spec_path(weights: str | Path) -> Path:
    """The JSON spec written beside a ``.safetensors`` weights file."""
    return Path(weights).with_suffix(".json")


def save_model(model: Segmenter, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``path`` (.safetensors) and its spec (.json), each atomically, spec first; the same
    weights and metadata always give the same bytes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: checkpoint path must end in .safetensors")
    model.spec.save(spec_path(path))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_safetensors(path, state, {**(metadata or {}), SPEC_KEY: _canonical(model.spec.to_dict())})


SPEC_KEY = "segcompress_spec"  # the architecture, as canonical JSON, in the weights' metadata


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (a clear error for one that is not)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"{path}: checkpoint not found") from None
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())}); "
                         "rewrite it with the stage that made it") from None


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a Segmenter from ``path`` (.safetensors) and the spec beside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    spec = SegmenterSpec.load(spec_path(path))
    stored = read_metadata(path).get(SPEC_KEY)
    if stored is not None and json.loads(stored) != json.loads(_canonical(spec.to_dict())):
        changed = sorted(k for k, v in json.loads(stored).items() if spec.to_dict().get(k) != v)
        raise ValueError(f"{spec_path(path)}: spec differs from the architecture stored in {path} "
                         f"({', '.join(changed)}); restore the .json or rewrite both with the stage that made them")
    model = build_segmenter(spec)
    try:
        state = load_file(str(path), device=str(map_location))
    except SafetensorError as e:  # a header that reads but data cut short
        raise ValueError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())}); "
                         "rewrite it with the stage that made it") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the spec in {spec_path(path)} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(map_location)
