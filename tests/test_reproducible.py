"""Byte-reproducible outputs: the same job gives the same bytes (DVC and any hash see no change)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from segcompress.io import write_safetensors

torch.set_num_threads(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_bytes_do_not_depend_on_key_order(tmp_path):
    """safetensors' own writer orders its header from a hash map; ours sorts it, so metadata and
    tensors given in any order give one file, which safetensors reads back unchanged."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3, i + 1, generator=g) for i in range(12)}
    meta = {f"key{i}": f"value {i}" for i in range(12)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, tensors, meta)
    write_safetensors(b, dict(reversed(tensors.items())), dict(reversed(meta.items())))
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    n = int.from_bytes(a.read_bytes()[:8], "little")
    assert n % 8 == 0 and json.loads(a.read_bytes()[8:8 + n])["__metadata__"] == meta


def test_two_trainings_of_the_same_settings_give_the_same_file(tmp_path, synthetic_dataset):
    from segcompress.cli import main

    root = synthetic_dataset("ade20k", 4, 0)
    arch = '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'
    recipe = json.dumps({"iters": 2, "batch_size": 2, "lr": 0.01, "num_workers": 0, "log_every": 0,
                         "checkpoint_every": 0})
    outs = [tmp_path / run / "dense.safetensors" for run in ("a", "b")]
    for out in outs:
        assert main(["train", "--layout", "ade20k", "--root", str(root), "--crop", "32", "--img-scale", "128", "32",
                     "--arch", arch, "--recipe", recipe, "--seed", "0", "--device", "cpu", "--out", str(out)]) == 0
    assert sha256(outs[0]) == sha256(outs[1])
    assert outs[0].with_suffix(".json").read_bytes() == outs[1].with_suffix(".json").read_bytes()
