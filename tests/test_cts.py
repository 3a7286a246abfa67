"""CTS: policy targets and training, token sharing, FLOPs."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcompress.flops import count_gmacs
from segcompress.methods import apply_method
from segcompress.tokens import cts
from segcompress.tokens.cts import cts_gmacs
from segcompress.tokens.cts import (
    PolicyNet, load_policy, mean_2x2, policy_targets, save_policy, share_tokens, top_superpatches, train_policy,
    uniform_scores,
)
from segcompress.tokens.cts import CTS
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec([64, 96], 16, 2))


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(1)
    return PolicyNet().eval()


class FixedPolicy(nn.Module):
    """A stand-in policy whose P(uniform) map is given."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores  # (Sh, Sw) in (0, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s = self.scores.clamp(1e-4, 1 - 1e-4).expand(img.shape[0], -1, -1)
        return torch.stack([torch.zeros_like(s), (s / (1 - s)).log()], dim=1)


def test_policy_targets():
    lab = torch.zeros(1, 96, 128, dtype=torch.long)  # superpatch grid 3x4 of 32x32 regions
    lab[:, 0:32, 32:64] = 3  # uniform other class -> 1
    lab[:, 40, 40] = 2  # two classes, interior region (1, 1) -> 0
    lab[:, 32:64, 96:128] = 255  # all ignore (border) -> 1
    lab[:, 64:96, 0:16] = 255  # one class + ignore on the border -> 255 (ADE) / 0 (Cityscapes)
    lab[:, 34, 70] = 255  # one class + ignore in the interior region (1, 2) -> 0
    ade = policy_targets(lab, 16, border_ignore=True)
    assert ade.shape == (1, 3, 4)
    assert ade[0, 0, 1] == 1 and ade[0, 1, 1] == 0 and ade[0, 1, 3] == 1 and ade[0, 2, 0] == 255
    assert ade[0, 1, 2] == 0 and ade[0, 0, 0] == 1
    cs = policy_targets(lab, 16, border_ignore=False)
    assert cs[0, 2, 0] == 0 and cs[0, 1, 2] == 0


@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (1, 3, 512, 512), (5, 4, 6)])
def test_mean_2x2_equals_the_mean_over_the_block_axes_bit_for_bit(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    h, w = shape[-2:]
    blocks = x.reshape(*shape[:-2], h // 2, 2, w // 2, 2)
    assert torch.equal(mean_2x2(x), blocks.mean(dim=(-3, -1)))


def test_k0_is_exactly_dense(model, policy):
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        dense = model(img)
        model.token_method = CTS(0, policy)
        try:
            assert torch.equal(model(img), dense)
        finally:
            model.token_method = None


def test_sharing_embeds_pooled_pixels_and_averaged_positions(model):
    torch.manual_seed(2)
    img = torch.randn(1, 3, 64, 96)
    scores = torch.zeros(1, 2 * 3)
    scores[0, 4] = 1.0  # superpatch (1, 1) -> patches (2..3, 2..3)
    scores[0, 0] = 0.5  # superpatch (0, 0)
    with torch.no_grad():
        state = share_tokens(model.encoder, img, scores, 2)
        dense = model.embed(img)
    n = 4 * 6
    assert state.num_tokens == 1 + n - 3 * 2
    assert torch.equal(state.size.sum(1), torch.tensor([1.0 + n]))
    # unshared patches: exactly the dense embedding
    restored = state.unmerge()
    grid = torch.arange(n).view(4, 6)
    shared = torch.zeros(4, 6, dtype=torch.bool)
    shared[0:2, 0:2] = shared[2:4, 2:4] = True
    assert torch.allclose(restored[0, ~shared.view(-1)], dense[0, 1:][~shared.view(-1)], atol=1e-5)
    # a shared token: patch embedding of 2x2-averaged pixels + mean of its 4 position embeddings
    pe = model.encoder.patch_embed
    px = F.avg_pool2d(img[:, :, 32:64, 32:64], 2)
    emb = pe.proj(px).flatten(1)
    pos = model.encoder.pos_embed[0, 1:][grid[2:4, 2:4].reshape(-1)].mean(0)
    tok = state.token_of[0, grid[2, 2]]
    assert torch.equal(state.token_of[0, grid[2:4, 2:4].reshape(-1)], tok.expand(4))
    assert torch.allclose(state.x[0, tok], emb[0] + pos, atol=1e-5)
    # order: [cls, unshared row-major, shared row-major]
    assert int(state.token_of[0, 0]) == 1 + n - 8 and int(tok) == 1 + n - 8 + 1


def test_top_k_follows_the_policy(model):
    scores = torch.tensor([[0.9, 0.1, 0.8], [0.2, 0.3, 0.7]])
    method = CTS(2, FixedPolicy(scores))
    img = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        state = method.start(model, img)
    sizes = state.size.gather(1, state.token_of).view(4, 6)
    chosen = sizes[::2, ::2].eq(4)
    assert torch.equal(chosen, torch.tensor([[True, False, True], [False, False, False]]))
    assert torch.allclose(uniform_scores(method.policy, img, (4, 6)).sigmoid(), scores.view(1, -1), atol=1e-3)


class LogitPolicy(nn.Module):
    """A stand-in policy whose logit difference map (Sh, Sw) is given."""

    def __init__(self, diff: torch.Tensor) -> None:
        super().__init__()
        self.diff = diff

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        d = self.diff.expand(img.shape[0], -1, -1)
        return torch.stack([torch.zeros_like(d), d], dim=1)


def test_saturated_policies_rank_by_logit_difference_with_a_stable_tie_break(model):
    """P(uniform) saturates at 1.0 in float32 (the three confident superpatches tie under softmax);
    the logit difference keeps their order, and exact ties go to the lowest index."""
    diff = torch.tensor([[20.0, -3.0, 30.0], [25.0, 0.0, 1.0]])
    img = torch.randn(1, 3, 64, 96)
    softmax = torch.stack([torch.zeros_like(diff), diff]).softmax(0)[1]
    assert softmax[0, 0] == softmax[0, 2] == softmax[1, 0] == 1.0  # tied under the softmax
    scores = uniform_scores(LogitPolicy(diff), img, (4, 6))
    assert torch.equal(top_superpatches(scores, 2), torch.tensor([[2, 3]]))  # 30 then 25, not 20
    with torch.no_grad():
        state = CTS(2, LogitPolicy(diff)).start(model, img)
    chosen = state.size.gather(1, state.token_of).view(4, 6)[::2, ::2].eq(4)
    assert torch.equal(chosen, torch.tensor([[False, False, True], [True, False, False]]))
    tied = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0, 2.0]])
    assert torch.equal(top_superpatches(tied, 3), torch.tensor([[1, 2, 4]]))
    assert torch.equal(top_superpatches(tied, 0), torch.zeros(1, 0, dtype=torch.long))


def test_policy_training_and_file_roundtrip(tmp_path):
    torch.manual_seed(3)
    policy = PolicyNet()
    img = torch.randn(2, 3, 64, 64)
    lab = torch.randint(0, 3, (2, 64, 64))
    lab[:, :32] = 1
    run = train_policy(policy, [(img, lab)], iters=2, device="cpu")
    assert len(run.losses) == 2 and all(l == l for l in run.losses)
    # per image: the top row of 32x32 regions is one class, the bottom row mixes three
    assert run.uniform_fraction == 0.5
    path = tmp_path / "policy.safetensors"
    save_policy(policy, path, {"layout": "ade20k"})
    loaded = load_policy(path)
    with torch.no_grad():
        assert torch.allclose(loaded(img), policy.eval()(img), atol=1e-4)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing.safetensors")


def test_policy_stays_out_of_the_checkpoint_and_follows_the_model(model, policy):
    keys = set(model.state_dict())
    apply_method(model, "cts", {"k": 3})
    try:
        assert set(model.state_dict()) == keys
        assert all(not n.startswith("token_method.policy") for n, _ in model.named_parameters())
        model.double()
        assert next(model.token_method.policy.parameters()).dtype == torch.float64
    finally:
        model.float()
        apply_method(model, "dense")


@pytest.mark.parametrize("knob", [{"k": 3}, {"k": 6, "decoder_on_merged": False}])
def test_analytic_flops_equal_fvcore(model, knob):
    apply_method(model, "cts", knob)
    try:
        counted = count_gmacs(model, torch.randn(1, 3, 64, 96))
    finally:
        apply_method(model, "dense")
    assert counted == pytest.approx(cts_gmacs(model.spec, knob), rel=1e-9)


def test_patch8_uses_resized_policy_logits():
    m = tiny_model(tiny_spec([32, 48], 8, 2), seed=4)
    apply_method(m, "cts", {"k": 4})
    try:
        with torch.no_grad():
            assert m(torch.randn(2, 3, 32, 48)).shape == (2, 5, 32, 48)
        assert count_gmacs(m, torch.randn(1, 3, 32, 48)) == pytest.approx(cts_gmacs(m.spec, {"k": 4}), rel=1e-9)
    finally:
        apply_method(m, "dense")


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A random timm efficientnet_lite0 (the whole classifier) saved as .safetensors and .pth."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    full = timm.create_model("efficientnet_lite0", pretrained=False)
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    root = tmp_path_factory.mktemp("weights")
    save_file(state, str(root / "lite0.safetensors"))
    torch.save(state, root / "lite0.pth")
    return root, state


@pytest.mark.parametrize("name", ["lite0.safetensors", "lite0.pth"])
def test_policy_backbone_loads_pretrained_weights_from_a_local_file(timm_weights, name):
    root, state = timm_weights
    torch.manual_seed(6)  # a different random init: equal weights can only come from the file
    policy = PolicyNet(pretrained=str(root / name))
    own = policy.backbone.state_dict()
    assert len(own) > 100 and all(torch.equal(v, state[k]) for k, v in own.items())
    assert policy.init == f"file:{root / name}"
    torch.manual_seed(6)
    random = PolicyNet()
    assert random.init == "random"
    assert not torch.equal(random.backbone.conv_stem.weight, state["conv_stem.weight"])


def test_policy_pretrained_errors_are_one_clear_line(tmp_path, timm_weights):
    with pytest.raises(FileNotFoundError, match=r"missing.safetensors: CTS policy pretrained weights not found") as e:
        PolicyNet(pretrained=str(tmp_path / "missing.safetensors"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"must be a .safetensors or .pth file"):
        PolicyNet(pretrained=str(tmp_path / "weights.bin"))
    from safetensors.torch import save_file

    _, state = timm_weights
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.6")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"partial.safetensors: not efficientnet_lite0 weights \(\d+ of \d+"):
        PolicyNet(pretrained=str(tmp_path / "partial.safetensors"))


def test_policy_verb_records_the_init(tmp_path, timm_weights, capsys, synthetic_ade20k):
    from segcompress.cli import main
    from segcompress.tokens.cts import policy_init_of

    root = synthetic_ade20k  # trains on its 2 train images
    weights = timm_weights[0] / "lite0.safetensors"
    base = ["policy", "--layout", "ade20k", "--root", str(root), "--crop", "64", "--img-scale", "128", "64",
            "--iters", "1", "--recipe", '{"batch_size": 2, "log_every": 0}']
    assert main([*base, "--out", str(tmp_path / "random.safetensors")]) == 0
    assert policy_init_of(tmp_path / "random.safetensors") == "random"
    recipe = json.dumps({"batch_size": 2, "pretrained": str(weights)})  # the config key travels in the recipe
    assert main([*base, "--recipe", recipe, "--out", str(tmp_path / "file.safetensors")]) == 0
    assert policy_init_of(tmp_path / "file.safetensors") == f"file:{weights}"
    assert main([*base, "--recipe", recipe, "--pretrained", "none", "--out", str(tmp_path / "none.safetensors")]) == 0
    assert policy_init_of(tmp_path / "none.safetensors") == "random"
    capsys.readouterr()
    missing = tmp_path / "missing.pth"
    assert main([*base, "--pretrained", str(missing), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.pth: CTS policy pretrained weights not found" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_folded_policy_gives_the_plain_logits_and_choice():
    """fold_policy (batch norms folded, each convolution and its activation one oneDNN call, channels-last) computes what the plain net does."""
    from segcompress.tokens.cts import fold_policy

    torch.manual_seed(4)
    plain = PolicyNet().eval()
    for m in plain.modules():  # trained-like statistics, so that folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    rng = torch.get_rng_state()
    folded = fold_policy(plain)
    assert torch.equal(torch.get_rng_state(), rng)  # no fresh layer drew from the global RNG
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in state.items())  # the plain net is untouched
    img = torch.randn(3, 3, 128, 160)
    with torch.inference_mode():
        ref, out = plain(img), folded(img)
        scale = ref.abs().max()
        assert out.shape == ref.shape and scale > 1
        assert torch.allclose(out, ref, atol=1e-5 * scale, rtol=1e-5)
        grid = (img.shape[-2] // 16, img.shape[-1] // 16)
        s_ref, s_out = uniform_scores(plain, img, grid), uniform_scores(folded, img, grid)
    assert torch.equal(top_superpatches(s_out, 20), top_superpatches(s_ref, 20))


def _fused_calls(fn) -> int:
    """How many oneDNN fused convolutions ``fn()`` runs (from the profiler's events)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_convolution_pointwise")


@pytest.mark.skipif(not cts.ONEDNN_FUSION, reason="this PyTorch build has no oneDNN fused convolution")
def test_fused_convolutions_compute_what_convolution_then_activation_does(monkeypatch):
    """Every convolution of the folded policy runs with its activation as one ConvAct; on CPU each
    is one fused oneDNN call, whose logits equal the unfused convolution-then-activation's to
    float32 rounding, with channels-last feature maps and ReLU6's bound; the unfused path runs
    when oneDNN is off, under autocast and when a gradient is wanted."""
    from segcompress.tokens.cts import ConvAct, fold_policy

    torch.manual_seed(6)
    folded = fold_policy(PolicyNet().eval())
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    fused = [m for m in folded.modules() if isinstance(m, ConvAct)]
    assert len(fused) == len(convs) > 40 and {f.attr for f in fused} == {"none", "hardtanh"}
    img = torch.randn(2, 3, 96, 128).contiguous(memory_format=torch.channels_last)
    seen = []
    for f in fused:
        f.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.inference_mode():
        outs = []
        assert _fused_calls(lambda: outs.append(folded(img))) == len(fused)
        out = outs[0]
        assert all(o.is_contiguous(memory_format=torch.channels_last) for o in seen)
        assert max(float(o.max()) for o, f in zip(seen, fused) if f.attr == "hardtanh") <= 6.0
        with torch.backends.mkldnn.flags(enabled=False):
            assert _fused_calls(lambda: folded(img)) == 0
            ref = folded(img)
        monkeypatch.setattr(cts, "ONEDNN_FUSION", False)
        assert _fused_calls(lambda: outs.append(folded(img))) == 0
        monkeypatch.undo()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _fused_calls(lambda: folded(img)) == 0
            low = folded(img)
    for unfused in (ref, outs[1]):
        assert torch.allclose(out, unfused, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)
    assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), ref, atol=0.1 * float(ref.abs().max()))
    x = img.clone().requires_grad_(True)
    assert _fused_calls(lambda: folded(x).sum().backward()) == 0 and x.grad.abs().sum() > 0


@pytest.mark.skipif(not cts.ONEDNN_FUSION, reason="this PyTorch build has no oneDNN fused convolution")
def test_inference_policy_runs_blocked_on_cpu_with_the_channels_last_logits():
    """On CPU inference the folded net runs on oneDNN tensors from input to logits: the logits are
    dense, equal the channels-last path's to float32 rounding and share the same superpatches; under
    autocast, with oneDNN off or with a gradient wanted it runs channels-last instead."""
    from segcompress.tokens.cts import InferencePolicy

    torch.manual_seed(7)
    policy = InferencePolicy(PolicyNet())
    img = torch.randn(3, 3, 128, 160)
    layouts = []
    probe = policy.folded.backbone.blocks[-1].register_forward_hook(lambda m, i, o: layouts.append(o.layout))
    with torch.inference_mode():
        assert policy.blocked(img)
        out = policy(img)
        channels_last = policy.folded(img.contiguous(memory_format=torch.channels_last))
        with torch.backends.mkldnn.flags(enabled=False):
            assert not policy.blocked(img)
            policy(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not policy.blocked(img)
    probe.remove()
    assert layouts == [torch._mkldnn, torch.strided, torch.strided]  # blocked, channels-last, oneDNN off
    assert out.layout == torch.strided and out.shape == channels_last.shape == (3, 2, 4, 5)
    assert torch.allclose(out, channels_last, atol=1e-5 * float(channels_last.abs().max()), rtol=1e-5)
    grid = (img.shape[-2] // 16, img.shape[-1] // 16)
    with torch.inference_mode():
        scores = uniform_scores(policy, img, grid)
        scores_cl = uniform_scores(lambda x: policy.folded(x.contiguous(memory_format=torch.channels_last)), img, grid)
    for k in (3, 7, 12):  # of the 20 superpatches
        assert torch.equal(top_superpatches(scores, k), top_superpatches(scores_cl, k))
    assert not policy.blocked(img.requires_grad_(True))
    # a layer of its own besides the fused convolutions (here where a squeeze-excite would sit; a
    # hardtanh, which a oneDNN tensor cannot take): the net runs channels-last, the same logits
    assert policy.blockable
    plain = PolicyNet().eval()
    assert isinstance(plain.backbone.blocks[-1][0].se, nn.Identity)
    plain.backbone.blocks[-1][0].se = nn.Hardtanh(-1e4, 1e4)
    other = InferencePolicy(plain)
    with torch.inference_mode():
        assert not other.blockable and not other.blocked(img)
        assert torch.allclose(other(img), plain(img), atol=1e-4)


def test_load_policy_returns_the_folded_net(tmp_path):
    torch.manual_seed(5)
    policy = PolicyNet().eval()
    path = tmp_path / "policy.safetensors"
    save_policy(policy, path)
    loaded = load_policy(path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.folded.modules())
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(img), policy(img), atol=1e-5)
    # FLOPs are counted on the plain net (batch norms included), as policy_gmacs counts them
    assert count_gmacs(loaded, img) == pytest.approx(count_gmacs(policy, img), rel=1e-12)
    assert count_gmacs(loaded, img) > count_gmacs(loaded.folded, img)


def test_a_narrower_policy_net_is_counted_recorded_and_rebuilt(tmp_path, model):
    """channel_multiplier narrows the policy: fewer counted GFLOPs (fvcore on the net that runs),
    the file records it, loading rebuilds that net, and a file of another width is refused."""
    from segcompress.tokens.cts import channel_multiplier_of, policy_gmacs

    torch.manual_seed(5)
    narrow = PolicyNet(channel_multiplier=0.2).eval()
    assert narrow.backbone.feature_info.channels()[-1] == 64  # 320 x 0.2
    assert policy_gmacs(64, 96, 16, 0.2) < 0.25 * policy_gmacs(64, 96, 16)
    path = tmp_path / "narrow.safetensors"
    save_policy(narrow, path)
    assert channel_multiplier_of(path) == 0.2
    img = torch.randn(2, 3, 64, 96)
    loaded = load_policy(path)
    with torch.no_grad():
        assert torch.allclose(loaded(img), narrow(img), atol=1e-4)
    assert load_policy(path, channel_multiplier=0.2) is not None
    with pytest.raises(ValueError, match="narrow.safetensors: CTS policy trained with channel_multiplier 0.2, "
                                         "the settings say 1.0; retrain it"):
        load_policy(path, channel_multiplier=1.0)
    # the whole CTS model, traced, costs what cts_gmacs counts at that multiplier (file's width)
    apply_method(model, "cts", {"k": 3, "policy_file": str(path)})
    try:
        counted = count_gmacs(model, img[:1])
    finally:
        apply_method(model, "dense")
    assert counted == pytest.approx(cts_gmacs(model.spec, {"k": 3}, channel_multiplier=0.2), rel=1e-9)
    assert counted < cts_gmacs(model.spec, {"k": 3})
    from segcompress.methods import get

    cost = get("cts").code().cost(model.spec, {"k": 3, "policy_file": str(path)})
    assert cost.mean == pytest.approx(counted, rel=1e-9)
    cost = get("cts").code().cost(model.spec, {"k": 3, "policy": {"channel_multiplier": 0.2}})  # no file: settings
    assert cost.mean == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("multiplier, pretrained, message", [
    (0.0, None, r"channel_multiplier must be in \(0, 1\], got 0.0"),
    (1.5, None, r"channel_multiplier must be in \(0, 1\], got 1.5"),
    (0.5, "timm", "pretrained weights \\('timm'\\) exist for efficientnet_lite0 itself only"),
])
def test_policy_channel_multiplier_errors(multiplier, pretrained, message):
    with pytest.raises(ValueError, match=message):
        PolicyNet(pretrained=pretrained, channel_multiplier=multiplier)


def test_policy_verb_trains_the_configured_width(tmp_path, synthetic_ade20k):
    from segcompress.cli import main
    from segcompress.tokens.cts import channel_multiplier_of, policy_init_of

    out = tmp_path / "narrow.safetensors"
    recipe = json.dumps({"batch_size": 2, "log_every": 0, "channel_multiplier": 0.2})
    assert main(["policy", "--layout", "ade20k", "--root", str(synthetic_ade20k), "--crop", "64", "--img-scale",
                 "128", "64", "--iters", "1", "--recipe", recipe, "--out", str(out)]) == 0
    assert channel_multiplier_of(out) == 0.2 and policy_init_of(out) == "random"
