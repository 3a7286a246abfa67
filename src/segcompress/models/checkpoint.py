"""Model checkpoints: weights as safetensors plus the architecture spec as JSON beside them.

``save_model(model, "models/x/dense.safetensors")`` writes ``dense.safetensors`` and
``dense.json``; ``load_model`` rebuilds the model from the JSON alone (no pruning or merging code
needed) and loads the weights. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
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
    write_safetensors(path, state, metadata)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a Segmenter from ``path`` (.safetensors) and the spec beside it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    spec = SegmenterSpec.load(spec_path(path))
    model = build_segmenter(spec)
    state = load_file(str(path), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the spec in {spec_path(path)} "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.to(map_location)
