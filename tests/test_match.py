"""FLOPs matching of the token methods' knobs, and the `segcompress match` verb."""

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from segcompress.cli import main as cli_main
from segcompress.flops import analytic_gmacs
from segcompress.models import build_segmenter
from segcompress.methods import solve
from segcompress.tokens.algm import algm_cost
from segcompress.tokens.cts import cts_gmacs
from segcompress.tokens.tome import tome_gmacs
from tiny_segmenter import tiny_spec

torch.set_num_threads(1)


spec = partial(tiny_spec, img_size=128, patch_size=16, depth=6, num_classes=4)


@pytest.mark.parametrize("fraction", [0.9, 0.75, 0.6])
@pytest.mark.parametrize("on_merged", [False, True])
def test_tome_match_is_exact_and_within_tolerance(fraction, on_merged):
    s = spec()
    target = fraction * analytic_gmacs(s)
    m = solve("tome", s, target, {"decoder_on_merged": on_merged})
    assert m.within_tolerance and abs(m.achieved_gflops - target) <= 0.01 * target
    assert m.achieved_gflops == tome_gmacs(s, m.knob)
    r = m.knob["r"]
    if isinstance(r, list):  # first j layers r+1, the rest r
        assert len(set(r)) <= 2 and r == sorted(r, reverse=True) and r[0] - r[-1] <= 1


def test_cts_match_scans_k():
    s = spec(img_size=256, embed_dim=64, num_classes=3)
    target = 0.7 * analytic_gmacs(s)
    m = solve("cts", s, target, {"include_policy_net": False})  # the policy net alone outweighs this tiny ViT
    assert m.within_tolerance
    assert m.achieved_gflops == cts_gmacs(s, m.knob, include_policy=False)
    assert m.knob["k"] > 0
    with_policy = solve("cts", s, target)
    assert not with_policy.within_tolerance and "below cts's reach" in with_policy.message
    # the share of superpatches shared, beside the uniform share the policy saw (none: no file)
    assert m.extra["shared_fraction"] == m.knob["k"] / 64 and m.extra["uniform_fraction"] is None


def test_cts_match_reports_the_uniform_share_its_policy_saw(tmp_path):
    from segcompress.tokens.cts import PolicyNet, save_policy

    path = tmp_path / "policy.safetensors"
    save_policy(PolicyNet(), path, {"uniform_fraction": "0.24"})
    s = spec(img_size=256, embed_dim=64, num_classes=3)
    m = solve("cts", s, 0.7 * analytic_gmacs(s), {"include_policy_net": False, "policy_file": str(path)})
    assert m.extra["uniform_fraction"] == 0.24 and 0 < m.extra["shared_fraction"] <= 1
    # what the evaluation rows carry for the report: the net's init, width and counted cost
    from segcompress.tokens.cts import policy_gmacs

    assert m.extra["policy_init"] == "random" and m.extra["policy_channel_multiplier"] == 1.0
    assert m.extra["policy_gflops"] == policy_gmacs(256, 256, s.patch_size)
    # the width is the file's: a narrower policy file counts the narrower net, with or without
    # the setting; settings that name another width than the file's say to retrain it
    narrow = tmp_path / "narrow.safetensors"
    save_policy(PolicyNet(channel_multiplier=0.2), narrow)
    target = 0.7 * analytic_gmacs(s)
    for settings in ({}, {"policy": {"channel_multiplier": 0.2}}):
        m = solve("cts", s, target, {**settings, "policy_file": str(narrow)})
        assert m.extra["policy_channel_multiplier"] == 0.2
        assert m.extra["policy_gflops"] == policy_gmacs(256, 256, s.patch_size, 0.2) < policy_gmacs(256, 256, s.patch_size)
        assert m.achieved_gflops == cts_gmacs(s, m.knob, channel_multiplier=0.2)
    with pytest.raises(ValueError, match="narrow.safetensors: CTS policy trained with channel_multiplier 0.2, the "
                                         "settings say 1.0; retrain it"):
        solve("cts", s, target, {"policy": {"channel_multiplier": 1.0}, "policy_file": str(narrow)})
    with pytest.raises(FileNotFoundError, match="missing.safetensors: CTS policy weights not found"):
        solve("cts", s, 0.7 * analytic_gmacs(s), {"policy_file": str(tmp_path / "missing.safetensors")})


def test_out_of_reach_is_reported():
    s = spec()
    m = solve("tome", s, 0.01 * analytic_gmacs(s))
    assert not m.within_tolerance and "below tome's reach" in m.message
    assert m.achieved_gflops == pytest.approx(m.reach_gflops[0])


def test_algm_bisection_on_calibration_images():
    torch.manual_seed(0)
    model = build_segmenter(spec(img_size=64, depth=4)).eval()
    g = torch.Generator().manual_seed(1)
    imgs = F.interpolate(torch.randn(6, 3, 4, 4, generator=g), size=(64, 64), mode="nearest")
    imgs = imgs + 0.3 * torch.randn(6, 3, 64, 64, generator=g)
    batches = [imgs[:3], imgs[3:]]
    knob = {"layers": [1, 3]}
    lo = algm_cost(model, batches, {**knob, "threshold": -1.01}).mean
    hi = algm_cost(model, batches, {**knob, "threshold": 1.01}).mean
    target = 0.5 * (lo + hi)
    m = solve("algm", model.spec, target, knob, model=model, images=batches)
    assert m.within_tolerance, m.message
    assert m.reach_gflops == pytest.approx((lo, hi))
    again = algm_cost(model, batches, m.knob)
    assert again.mean == pytest.approx(m.achieved_gflops) and again.std == pytest.approx(m.gflops_std)
    assert m.extra["calibration_images"] == 6
    above = solve("algm", model.spec, 1.2 * hi, knob, model=model, images=batches)
    assert not above.within_tolerance and "above algm's reach" in above.message


def test_match_verb_prints_json(capsys):
    arch = json.dumps({"patch_size": 16, "embed_dim": 32, "depth": 6, "num_heads": 2})
    rc = cli_main(["match", "--method", "tome", "--target-fraction", "0.8", "--arch", arch,
                   "--num-classes", "4", "--crop", "128", "--settings", '{"prop_attn": false}'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("knob", "achieved_gflops", "target_gflops", "within_tolerance", "dense_gflops", "target_fraction"):
        assert key in out
    assert out["within_tolerance"] and out["knob"]["prop_attn"] is False
    assert out["target_fraction"] == pytest.approx(0.8)


def test_match_verb_rejects_dense_and_algm_without_images(capsys):
    arch = json.dumps({"patch_size": 16, "embed_dim": 32, "depth": 6, "num_heads": 2})
    common = ["--target-fraction", "0.8", "--arch", arch, "--num-classes", "4", "--crop", "128"]
    assert cli_main(["match", "--method", "dense", *common]) == 2
    assert cli_main(["match", "--method", "algm", *common]) == 2
    assert "--calib-root" in capsys.readouterr().err


def test_match_verb_runs_on_its_device(capsys):
    """--device as the other verbs take it: CUDA where asked for is checked; calibration batches
    reach the model's device one at a time, the originals left where they were."""
    from segcompress.commands.match import OnDevice

    arch = json.dumps({"patch_size": 16, "embed_dim": 32, "depth": 6, "num_heads": 2})
    common = ["--target-fraction", "0.8", "--arch", arch, "--num-classes", "4", "--crop", "128"]
    if not torch.cuda.is_available():
        assert cli_main(["match", "--method", "tome", *common, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert cli_main(["match", "--method", "tome", *common, "--device", "cpu"]) == 0
    batches = [torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)]
    moved = OnDevice(batches, "meta")
    assert len(moved) == 2 and [b.device.type for b in moved] == ["meta", "meta"]
    assert [tuple(b.shape) for b in moved] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert all(b.device.type == "cpu" for b in batches)


def test_policy_and_algm_match_verbs_on_a_dataset(synthetic_ade20k, tmp_path, capsys):
    from segcompress.models.checkpoint import save_model
    from segcompress.tokens.cts import load_policy

    torch.manual_seed(0)
    model_path = tmp_path / "dense.safetensors"
    save_model(build_segmenter(spec(img_size=64, depth=4)), model_path)
    policy = tmp_path / "policy.safetensors"
    assert cli_main(["policy", "--model", str(model_path), "--layout", "ade20k", "--root", str(synthetic_ade20k),
                     "--img-scale", "128", "64", "--recipe", '{"iters": 1, "batch_size": 2}', "--out", str(policy)]) == 0
    load_policy(policy)
    capsys.readouterr()
    assert cli_main(["match", "--method", "algm", "--target-fraction", "0.8", "--model", str(model_path),
                     "--calib-root", str(synthetic_ade20k), "--calib-images", "3",
                     "--settings", '{"layers": [1, 3]}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration_images"] == 3 and out["knob"]["layers"] == [1, 3] and "threshold" in out["knob"]
    assert out["within_tolerance"] or out["message"]


def test_random_weights_of_arch_and_backbone_are_seeded(synthetic_ade20k, capsys):
    """--arch/--backbone build their random weights from --seed: the same ALGM match twice, and
    the global generator is left alone."""
    import argparse

    from segcompress.commands._model_options import add_model_arguments, spec_and_model

    arch = json.dumps({"patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2})
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    common = ["--arch", arch, "--num-classes", "150", "--crop", "64"]

    def weights(*extra: str) -> torch.Tensor:
        _, model, source = spec_and_model(parser.parse_args([*common, *extra]))
        assert source.startswith("random init (seed ")
        return model.encoder.blocks[0].attn.qkv.weight.detach().clone()

    state = torch.random.get_rng_state()
    assert torch.equal(weights(), weights("--seed", "0"))
    assert not torch.equal(weights(), weights("--seed", "1"))
    assert torch.equal(torch.random.get_rng_state(), state)
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs) + 7)  # whatever the global generator holds
        assert cli_main(["match", "--method", "algm", "--target-fraction", "0.9", *common, "--calib-root",
                         str(synthetic_ade20k), "--calib-images", "2", "--settings", '{"layers": [1, 3]}']) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert runs[0]["knob"] == runs[1]["knob"] and runs[0]["achieved_gflops"] == runs[1]["achieved_gflops"]
    assert runs[0]["weights"] == "random init (seed 0)"
