"""Training: recipe, poly schedule, loss, resume after a crash, multi-process (gloo) training, CLI errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcompress.models.checkpoint import load_model
from segcompress.resume import latest_resume
from segcompress.train import (
    Callbacks, Distillation, Output, Recipe, Runtime, WorldBatchSampler, build_optimizer, fit, loss_offset,
    pixel_loss_sums, poly_lr, sampled_logits,
)
from tiny_segmenter import tiny_model
from toy_training import ToyScenes, tiny_spec

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PYTHON = sys.executable
CPU = Runtime(device="cpu")


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------- recipe


def test_poly_schedule_values():
    r = Recipe(iters=100, lr=1e-2, min_lr=1e-5)
    assert poly_lr(0, r) == pytest.approx(1e-2)
    assert poly_lr(50, r) == pytest.approx((1e-2 - 1e-5) * 0.5 ** 0.9 + 1e-5)
    assert poly_lr(99, r) == pytest.approx((1e-2 - 1e-5) * 0.01 ** 0.9 + 1e-5)
    assert poly_lr(100, r) == pytest.approx(1e-5)
    lrs = [poly_lr(t, r) for t in range(101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    r2 = Recipe(iters=10, lr=1.0, min_lr=0.0, poly_power=1.0)
    assert [poly_lr(t, r2) for t in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_recipe_defaults_are_segmenter_ade20k():
    r = Recipe()
    assert (r.iters, r.batch_size, r.lr, r.min_lr, r.momentum, r.weight_decay, r.poly_power, r.amp) == (
        160_000, 8, 1e-3, 1e-5, 0.9, 0.0, 0.9, False)
    assert (r.optimizer, r.warmup_iters, r.loss_stride) == ("sgd", 0, 1)  # SGD, no warm-up, every pixel
    assert isinstance(build_optimizer(tiny_model(tiny_spec(), 0, train=True), r), torch.optim.SGD)
    adamw = build_optimizer(tiny_model(tiny_spec(), 0, train=True),
                            Recipe(optimizer="adamw", lr=2e-3, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05


def test_warmup_ramps_linearly_into_the_poly_schedule():
    r = Recipe(iters=100, lr=1e-2, min_lr=0.0, warmup_iters=10)
    plain = Recipe(iters=100, lr=1e-2, min_lr=0.0)
    assert [poly_lr(t, r) for t in (0, 4, 9)] == pytest.approx([poly_lr(t, plain) * (t + 1) / 10 for t in (0, 4, 9)])
    assert [poly_lr(t, r) for t in range(10, 101)] == [poly_lr(t, plain) for t in range(10, 101)]


@pytest.mark.parametrize("data, words", [
    ({"iters": 10, "lr0": 1, "warmup": 3}, ["lr0", "warmup", "allowed"]),
    ({"iters": "10"}, ["iters", "integer"]),
    ({"iters": 10.0}, ["iters", "integer"]),
    ({"lr": 1e-3, "min_lr": 1e-2}, ["min_lr"]),
    ({"amp": 1}, ["amp"]),
    ({"batch_size": 0}, ["batch_size"]),
    ({"optimizer": "adam"}, ["optimizer", "sgd, adamw"]),
    ({"optimizer": 1}, ["optimizer", "string"]),
    ({"warmup_iters": -1}, ["warmup_iters"]),
    ({"loss_stride": 0}, ["loss_stride"]),
])
def test_recipe_rejects_bad_keys_by_name(data, words):
    with pytest.raises(ValueError) as e:
        Recipe.from_dict(data, source="cfg.yaml:train")
    msg = str(e.value)
    assert msg.startswith("cfg.yaml:train") and "\n" not in msg
    for w in words:
        assert w in msg


def test_recipe_coerces_ints_to_floats():
    r = Recipe.from_dict({"lr": 1, "min_lr": 0})
    assert isinstance(r.lr, float) and isinstance(r.min_lr, float)


# --------------------------------------------------------------------------------- data, loss


def test_world_batch_sampler_shards_and_permutes():
    one = WorldBatchSampler(10, 4, 0, 1, seed=3, start=0, end=5)
    ranks = [WorldBatchSampler(10, 4, r, 2, seed=3, start=0, end=5) for r in range(2)]
    world = [b0 + b1 for b0, b1 in zip(*ranks)]
    assert world == list(one)
    items = [i for batch in one for i, _ in batch]
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:20]) == list(range(10))
    assert items[:10] != items[10:20]  # a fresh permutation each epoch
    assert len({s for batch in one for _, s in batch}) == 20  # a seed per sample position
    assert list(WorldBatchSampler(10, 4, 0, 1, seed=3, start=2, end=5)) == list(one)[2:]
    with pytest.raises(ValueError, match="divisible"):
        WorldBatchSampler(10, 3, 0, 2, seed=0, start=0, end=1)


def test_pixel_loss_sums_ignore_and_distillation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    labels = torch.randint(0, 4, (2, 5, 5), generator=g)
    labels[0, 0] = 255
    ce, kd, n = pixel_loss_sums(logits, labels)
    assert n.item() == 45 and kd.item() == 0
    mean = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    assert (ce / n).item() == pytest.approx(mean.item(), rel=1e-6)
    _, kd_same, _ = pixel_loss_sums(logits, labels, logits.clone(), temperature=2.0)
    assert abs(kd_same.item()) < 1e-5
    teacher = torch.randn(2, 4, 5, 5, generator=g)
    _, kd_t, _ = pixel_loss_sums(logits, labels, teacher, temperature=2.0)
    valid = (labels != 255).unsqueeze(1)
    p_t = (teacher / 2).softmax(1)
    ref = (p_t * ((teacher / 2).log_softmax(1) - (logits / 2).log_softmax(1)) * valid).sum() * 4
    assert kd_t.item() == pytest.approx(ref.item(), rel=1e-5)


def test_pixel_loss_sums_do_not_depend_on_memory_layout():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 6, 5, generator=g)
    labels = torch.randint(0, 4, (2, 6, 5), generator=g)
    labels[1, :2] = 255
    cl = logits.contiguous(memory_format=torch.channels_last)  # Segmenter's layout
    nchw = pixel_loss_sums(logits, labels, teacher, 2.0)
    last = pixel_loss_sums(cl, labels, teacher.contiguous(memory_format=torch.channels_last), 2.0)
    for a, b in zip(nchw, last):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    grad_nchw, = torch.autograd.grad(nchw[0] + nchw[1], logits)
    grad_last, = torch.autograd.grad(last[0] + last[1], logits)
    assert torch.allclose(grad_nchw, grad_last, atol=1e-6)


@pytest.mark.parametrize("grid, size, stride", [((4, 4), (32, 32), 4), ((3, 5), (24, 37), 3), ((4, 8), (32, 64), 1)])
def test_sampled_logits_are_the_upsampled_pixels(grid, size, stride):
    masks = torch.randn(2, *grid, 6).permute(0, 3, 1, 2)  # channels-last, as Segmenter's
    full = torch.nn.functional.interpolate(masks, size=size, mode="bilinear", align_corners=False)
    for oy in range(stride):
        for ox in range(stride):
            part = sampled_logits(masks, size, stride, (oy, ox))
            assert torch.allclose(part, full[..., oy::stride, ox::stride], atol=1e-5)


def test_loss_offsets_cover_every_pixel_and_are_seeded():
    offsets = [loss_offset(3, t, 4) for t in range(200)]
    assert set(offsets) == {(y, x) for y in range(4) for x in range(4)}
    assert offsets == [loss_offset(3, t, 4) for t in range(200)] != [loss_offset(4, t, 4) for t in range(200)]


def test_strided_loss_trains_and_needs_grid_logits():
    recipe = Recipe(iters=30, batch_size=4, lr=3e-3, optimizer="adamw", warmup_iters=3, loss_stride=2,
                    checkpoint_every=0, log_every=0, num_workers=0)
    teacher = tiny_model(tiny_spec(), 1, train=True)
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=0, runtime=CPU)
    assert sum(res.losses[-5:]) / 5 < 0.5 * res.losses[0]  # learns: well below the initial loss
    kd = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), Recipe(**{**recipe.to_dict(), "iters": 2}), seed=0,
             runtime=CPU, distill=Distillation(teacher), callbacks=Callbacks(on_step=lambda info: info.kd <= 0))
    assert kd.step == 2  # the distillation term is taken on the same pixels
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="loss_stride.*forward_masks"):
        fit(plain, ToyScenes(), recipe, seed=0, runtime=CPU)


# ------------------------------------------------------------------------------------ training


def test_loss_decreases_on_a_learnable_task():
    recipe = Recipe(iters=40, batch_size=4, lr=0.1, checkpoint_every=0, log_every=0, num_workers=0)
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=0, runtime=CPU)
    assert res.completed and res.step == 40 and len(res.losses) == 40
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert last < 0.5 * math.log(3)  # well below chance


def test_amp_on_cpu_trains():
    recipe = Recipe(iters=12, batch_size=4, lr=0.1, checkpoint_every=0, log_every=0, num_workers=0, amp=True)
    # bfloat16 autocast on the CPU
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=0, runtime=CPU)
    assert all(math.isfinite(x) for x in res.losses)
    assert sum(res.losses[-3:]) < sum(res.losses[:3])
    assert all(p.dtype == torch.float32 for p in res.model.parameters())


def test_distillation_and_callbacks(tmp_path):
    recipe = Recipe(iters=3, batch_size=2, lr=0.05, checkpoint_every=0, log_every=0, num_workers=0)
    seen: list[tuple[str, int]] = []

    def on_grad(info):
        assert all(p.grad is not None for p in info.model.decoder.parameters())
        seen.append(("grad", info.step))

    def on_step(info):
        seen.append(("step", info.step))
        assert info.kd > 0 and info.loss == pytest.approx(info.ce + 0.5 * info.kd)
        return info.step == 2  # end early

    teacher = tiny_model(tiny_spec(), 1, train=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = tmp_path / "nvit.safetensors"
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=0, runtime=CPU, output=Output(out),
              distill=Distillation(teacher, weight=0.5, temperature=2.0), callbacks=Callbacks(on_grad, on_step),
              train_mode=False)
    assert seen == [("grad", 1), ("step", 1), ("grad", 2), ("step", 2)]
    assert res.completed and res.step == 2 and out.is_file()
    assert not res.model.training and not teacher.training
    assert _max_diff(before, teacher.state_dict()) == 0  # the teacher is never updated


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    """6 iterations, a resume point every 3; the crashed run is SIGKILLed during iteration 5 (with 2
    loader workers), then resumed here from iteration 3 on a model with a different init."""
    recipe = Recipe(iters=6, batch_size=4, lr=0.05, checkpoint_every=3, log_every=0, num_workers=0)
    ref = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=7, runtime=CPU,
              output=Output(tmp_path / "ref" / "dense.safetensors"))
    assert ref.completed and not (tmp_path / "ref" / "dense.resume").exists()

    out = tmp_path / "run" / "dense.safetensors"
    cmd = [PYTHON, str(TESTS / "toy_training.py"), "crash", str(out), "--num-workers", "2", "--kill-at", "5"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    point = latest_resume(out.with_suffix(".resume"))
    assert point is not None and point.step == 3
    assert sorted(p.name for p in point.path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    assert json.loads((point.path / "state.json").read_text())["optimizer"]["names"]  # momentum buffers by name

    res = fit(tiny_model(tiny_spec(), 123, train=True), ToyScenes(), recipe, seed=7, runtime=CPU, output=Output(out))
    assert res.start_step == 3 and res.completed and len(res.losses) == 3
    assert res.losses == ref.losses[3:]
    assert _max_diff(load_model(out).state_dict(), load_model(tmp_path / "ref" / "dense.safetensors").state_dict()) == 0
    assert not out.with_suffix(".resume").exists()


def test_stop_at_then_resume_and_changed_recipe_is_refused(tmp_path):
    recipe = Recipe(iters=4, batch_size=2, lr=0.05, checkpoint_every=0, log_every=0, num_workers=0)
    out = tmp_path / "dense.safetensors"
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=1,
              runtime=Runtime(device="cpu", stop_at=2), output=Output(out))
    assert not res.completed and res.step == 2 and not out.exists()
    assert latest_resume(out.with_suffix(".resume")).step == 2  # written at the stop even with checkpoint_every=0
    changed = Recipe(iters=4, batch_size=2, lr=0.01, checkpoint_every=0, log_every=0, num_workers=0)
    with pytest.raises(ValueError, match=r"recipe\.lr"):
        fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), changed, seed=1, runtime=CPU, output=Output(out))
    with pytest.raises(ValueError, match="different spec"):
        fit(tiny_model(tiny_spec(embed_dim=16), 0, train=True), ToyScenes(), recipe, seed=1, runtime=CPU,
            output=Output(out))
    bookkeeping = Recipe(iters=4, batch_size=2, lr=0.05, checkpoint_every=1, log_every=1, num_workers=0)
    res = fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), bookkeeping, seed=1, runtime=CPU, output=Output(out))
    assert res.start_step == 2 and res.completed and out.is_file()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(PYTHON).parent)) is None, reason="torchrun not installed")
def test_two_process_gloo_run_equals_one_process(tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo) with world batch 4 gives the weights of one
    process with batch 4: the data stream and augmentation depend on the world batch only, and
    the loss is normalised by the world's labelled pixels. (Drop-path is off: its masks differ.)"""
    out = tmp_path / "ddp" / "dense.safetensors"
    cmd = [str(Path(PYTHON).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(TESTS / "toy_training.py"), "ddp", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not out.with_suffix(".resume").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["dense.json", "dense.safetensors"]  # rank 0 wrote alone

    recipe = Recipe(iters=4, batch_size=4, lr=0.05, checkpoint_every=0, log_every=0, num_workers=0)
    no_dropout = tiny_spec(drop_path_rate=0.0, decoder_dropout=0.0)
    single = fit(tiny_model(no_dropout, 0, train=True), ToyScenes(), recipe, seed=7, runtime=CPU)
    init = tiny_model(no_dropout, 0, train=True).state_dict()
    ddp = load_model(out).state_dict()
    assert _max_diff(ddp, init) > 1e-2  # it trained
    assert _max_diff(ddp, single.model.state_dict()) < 1e-5


# ------------------------------------------------------------------------------------------ CLI


def test_json_arguments_inline_or_file_and_errors_name_the_option(tmp_path):
    from segcompress.commands._model_options import parse_json_arg

    f = tmp_path / "recipe.json"
    f.write_text('{"iters": 3}')
    assert parse_json_arg('{"iters": 3}', "--recipe") == parse_json_arg(str(f), "--recipe") == {"iters": 3}
    assert parse_json_arg(None, "--knob") == parse_json_arg("", "--knob") == {}
    with pytest.raises(ValueError, match=r"--knob: must be a JSON object"):
        parse_json_arg("[1, 2]", "--knob")
    with pytest.raises(FileNotFoundError, match=r"--recipe: 'nope.json' is neither inline JSON nor an existing file"):
        parse_json_arg("nope.json", "--recipe")
    f.write_text("{iters: 3}")
    with pytest.raises(ValueError, match=r"--recipe .*recipe\.json: invalid JSON"):
        parse_json_arg(str(f), "--recipe")


@pytest.mark.parametrize("extra, words", [
    (["--recipe", '{"iters": 10, "lrr": 1}'], ["--recipe", "lrr"]),
    (["--recipe", "{iters: 10}"], ["--recipe", "invalid JSON"]),
    (["--recipe", "missing.json"], ["--recipe", "missing.json"]),
    (["--arch", '{"embed_dim": 32}'], ["--arch", "missing"]),
    (["--arch", '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "width": 3}'], ["--arch", "width"]),
    (["--layout", "coco"], ["coco"]),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, capsys, extra, words):
    from segcompress.cli import main

    args = {"--layout": "ade20k", "--root": str(tmp_path), "--crop": "32", "--seed": "0",
            "--arch": '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
            "--out": str(tmp_path / "m.safetensors")}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    argv = ["train", "--img-scale", "64", "32"] + [x for kv in args.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segcompress train: error:") and "\n" not in err
    for w in words:
        assert w in err


def test_cli_trains_on_synthetic_ade20k_and_resumes_exactly(tmp_path, synthetic_dataset):
    """`segcompress train` on a synthetic ADE20K folder (mmseg's augmentation): stopped at 2 of 4
    iterations with a loader worker, then resumed, it ends where an uninterrupted run without
    workers ends."""
    pytest.importorskip("segcompress.data.datasets")
    from safetensors.torch import load_file

    from segcompress.cli import main

    root = synthetic_dataset("ade20k", 6, 0)
    arch = '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'

    def train(out: Path, workers: int, *extra: str) -> int:
        recipe = json.dumps({"iters": 4, "batch_size": 2, "lr": 0.01, "num_workers": workers, "log_every": 0,
                             "checkpoint_every": 0})
        return main(["train", "--layout", "ade20k", "--root", str(root), "--crop", "32", "--img-scale", "128", "32",
                     "--arch", arch, "--recipe", recipe, "--seed", "0", "--device", "cpu", "--out", str(out), *extra])

    a, b = tmp_path / "a" / "dense.safetensors", tmp_path / "b" / "dense.safetensors"
    assert train(a, 1, "--stop-at", "2") == 75 and not a.exists()
    assert train(a, 1) == 0 and a.is_file() and not a.with_suffix(".resume").exists()
    assert train(b, 0) == 0
    assert _max_diff(load_file(str(a)), load_file(str(b))) == 0
    assert load_model(a).spec.num_classes == 150
