"""DToP in the study: the heads trained on the frozen dense model (phase A), their file, the
policy, match and fine-tuning commands (phase B: the heads fine-tuned with the model)."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from segcompress.cli import main as cli_main
from segcompress.methods import dtop as dtop_method
from segcompress.tokens.dtop import DToP, DToPConfig, load_heads, save_heads
from segcompress.tokens.dtop_loss import head_canvases, head_loss
from segcompress.tokens.dtop_train import heads_recipe, train_heads
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)

spec = partial(tiny_spec, img_size=32, patch_size=8, depth=4, num_classes=5)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose left half is bright and right half dark, labelled 1 and 3."""
    img = torch.full((2, 3, 32, 32), -1.0)
    img[..., :16] = 1.0
    labels = torch.full((2, 32, 32), 3, dtype=torch.long)
    labels[..., :16] = 1
    return img + 0.05 * torch.randn_like(img), labels


def heads_loss(model, method, img, labels) -> float:
    method.eval()
    with torch.no_grad():
        st = method.run(model, img)
        return float(sum(head_loss(c, p, labels) for c, p in zip(head_canvases(st), st.presence)))


def test_phase_a_trains_the_heads_and_leaves_the_dense_model_alone():
    torch.manual_seed(0)
    model = tiny_model(spec(), train=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = DToP(model.spec, DToPConfig(threshold=0.7))
    img, labels = batch()
    start = heads_loss(model, method, img, labels)
    recipe = heads_recipe({"iters": 40, "batch_size": 2, "lr": 3e-3, "warmup_iters": 2})
    losses = train_heads(model, method, [(img, labels)], recipe)
    assert len(losses) == 40 and heads_loss(model, method, img, labels) < 0.7 * start
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and model.training  # flags and mode restored
    assert method.config.threshold == 0.7 and not method.training


def test_heads_file_round_trip_and_a_mismatch_is_refused_by_name(tmp_path):
    torch.manual_seed(1)
    model = tiny_model(spec())
    trained = DToP(model.spec, DToPConfig(threshold=0.5))
    for p in trained.heads.parameters():
        p.data.normal_()
    path = tmp_path / "heads.safetensors"
    save_heads(trained, model.spec, path, {"iters": 3})
    fresh = DToP(model.spec, DToPConfig(threshold=0.5))
    load_heads(fresh, model.spec, path)
    img, _ = batch()
    with torch.no_grad():
        assert torch.equal(trained.eval().masks(model, img), fresh.eval().masks(model, img))
    with pytest.raises(ValueError, match=r"heads.safetensors: heads trained for another setting: split \[2, 3\] "
                                         r"\(settings: \[1, 3\]\)"):
        load_heads(DToP(model.spec, DToPConfig(split=[1, 3])), model.spec, path)
    with pytest.raises(FileNotFoundError, match="segcompress policy --method dtop"):
        load_heads(fresh, model.spec, tmp_path / "missing.safetensors")


def test_untrained_heads_are_the_same_at_every_build():
    model = tiny_model(spec())
    a = dtop_method.build(model, {"threshold": 0.5})
    torch.manual_seed(123)
    b = dtop_method.build(model, {"threshold": 0.5})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_policy_match_and_finetune_commands(synthetic_ade20k, tmp_path, capsys):
    """policy --method dtop trains heads on the dense model; match solves the threshold with them;
    finetune --method dtop trains model and heads (exits on) and writes the heads and the knob."""
    from safetensors.torch import load_file

    from segcompress.models.checkpoint import save_model

    root, dense = str(synthetic_ade20k), tmp_path / "dense.safetensors"
    torch.manual_seed(0)
    save_model(tiny_model(spec(img_size=64, num_classes=150)), dense)
    heads = tmp_path / "dtop-policy.safetensors"
    settings = json.dumps({"policy": {"iters": 2, "batch_size": 2, "warmup_iters": 1}})
    common = ["--layout", "ade20k", "--root", root, "--img-scale", "128", "64"]
    assert cli_main(["policy", "--method", "dtop", "--model", str(dense), *common, "--settings", settings,
                     "--out", str(heads)]) == 0
    assert cli_main(["policy", "--method", "dtop", "--model", str(dense), *common, "--pretrained", "timm",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert cli_main(["policy", "--method", "tome", "--model", str(dense), *common,
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--pretrained: not an option of dtop's policy" in capsys.readouterr().err
    match = tmp_path / "dtop-1.15.json"
    assert cli_main(["match", "--method", "dtop", "--model", str(dense), "--policy", str(heads),
                     "--target-fraction", "1.15", "--calib-root", root, "--calib-images", "3",
                     "--out", str(match)]) == 0
    capsys.readouterr()
    solved = json.loads(match.read_text())
    assert solved["knob"]["policy_file"] == str(heads) and solved["heads_trained"]
    assert 0 < solved["knob"]["threshold"] < 1 and solved["within_tolerance"] and solved["calibration_images"] == 3

    # phase B at threshold 1: nothing exits, so only the heads' own loss terms reach the heads
    knob = tmp_path / "knob.json"
    knob.write_text(json.dumps({**solved, "knob": {**solved["knob"], "threshold": 1.0}}))
    out, tuned, tuned_match = tmp_path / "ft.safetensors", tmp_path / "ft.policy.safetensors", tmp_path / "ft-match.json"
    args = ["finetune", "--model", str(dense), "--teacher", "none", "--method", "dtop", "--knob", str(knob),
            *common, "--crop", "64", "--recipe", '{"iters": 2, "batch_size": 2, "checkpoint_every": 0, "lr": 0.01}',
            "--out", str(out)]
    assert cli_main(args) == 2
    assert "give --policy-out and --match-out" in capsys.readouterr().err
    bad = ["--policy-out", str(tmp_path / "heads.pt"), "--match-out", str(tuned_match)]
    assert cli_main([*args, *bad]) == 2 and not out.exists()  # refused before training
    assert "heads.pt" in capsys.readouterr().err
    assert cli_main([*args, "--policy-out", str(tuned), "--match-out", str(tuned_match)]) == 0
    a, b = load_file(str(heads)), load_file(str(tuned))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    written = json.loads(tuned_match.read_text())
    assert written["knob"] == {**solved["knob"], "threshold": 1.0, "policy_file": str(tuned)}
    assert written["policy_finetuned"] and written["finetuned_model"] == str(out)
    # its cost measured again with the fine-tuned heads (threshold 1: nothing exits, dense + heads)
    assert written["remeasured"] and written["calibration_images"] == 3
    assert written["achieved_gflops"] == pytest.approx(solved["reach_gflops"][1], rel=1e-9)
    assert written["within_tolerance"] is False and "after fine-tuning" in written["message"]
    assert not any(k.startswith("token_method") for k in load_file(str(out)))  # the bare model


@pytest.mark.parametrize("loss_stride", [1, 2])
def test_fit_adds_the_heads_loss_with_the_strided_loss_too(loss_stride):
    """Phase B through train.fit: at threshold 1 nothing exits, so only the heads' own loss terms
    (TokenMethod.training_loss, at the same strided pixels) reach the heads; eval mode as NViT."""
    from segcompress.methods import apply_method
    from segcompress.train import Recipe, Runtime, fit

    class Scenes(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            img, labels = batch()
            return img[0], labels[0]

    torch.manual_seed(2)
    model = tiny_model(spec())
    net = apply_method(model, "dtop", {"threshold": 1.0})
    before = {k: v.clone() for k, v in net.token_method.state_dict().items()}
    recipe = Recipe(iters=2, batch_size=2, lr=1e-2, checkpoint_every=0, log_every=0, num_workers=0,
                    loss_stride=loss_stride)
    result = fit(net, Scenes(), recipe, seed=0, train_mode=False, runtime=Runtime(device=torch.device("cpu")))
    after = net.token_method.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the heads trained
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert net.token_method.last is None  # training_loss took the state (and its graph)
