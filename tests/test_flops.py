"""FLOPs: the closed form equals fvcore's traced count, and both reproduce the published numbers."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcompress.cli import main as cli
from segcompress.flops import analytic_gmacs, bipartite_match_macs, count_gmacs
from segcompress.models import BlockDims, SegmenterSpec, build_segmenter, spec_from_timm
from segcompress.models.checkpoint import save_model

torch.set_num_threads(1)

TINY_SPECS = {
    "dense": SegmenterSpec(num_classes=5, img_size=64, patch_size=16, embed_dim=48, depth=2, num_heads=3),
    "non-square, narrow decoder": SegmenterSpec(
        num_classes=7, img_size=[64, 96], patch_size=8, embed_dim=64, depth=3, num_heads=4, decoder_dim=32,
        decoder_heads=2, decoder_layers=1),
    "pruned": SegmenterSpec(
        num_classes=5, img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3, attn_scale=0.25,
        blocks=[BlockDims(3, 16, 16, 192), BlockDims(2, 8, 12, 100), BlockDims(1, 5, 7, 33)]),
    "pruned, mlp ratio 2": SegmenterSpec(
        num_classes=3, img_size=[48, 32], patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        attn_scale=0.25, blocks=[BlockDims(2, 16, 16, 64), BlockDims(1, 3, 9, 17)]),
}


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_analytic_equals_fvcore(name):
    spec = TINY_SPECS[name]
    model = build_segmenter(spec)
    traced = count_gmacs(model, torch.randn(1, 3, *spec.crop))
    assert traced == pytest.approx(analytic_gmacs(spec), rel=1e-9)


def test_count_leaves_model_as_it_was():
    model = build_segmenter(TINY_SPECS["dense"]).train()
    count_gmacs(model, torch.randn(1, 3, 64, 64))
    assert model.training
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


class ShrinkingSegmenter(nn.Module):
    """A Segmenter run the ways token methods change the token counts, to check the closed form.

    Fewer patches are embedded (CTS), a bipartite similarity matmul is computed in every block
    (ToMe/ALGM matching) and tokens are dropped between attention and MLP (merging), the decoder
    sees fewer tokens (ALGM) that are gathered back to the grid, and a small policy net runs on
    the image. Dropping instead of merging changes nothing counted (fvcore counts no element-wise
    op, gather or sum).
    """

    def __init__(self, seg, embed_rows, keep, decoder_tokens, match_dim):
        super().__init__()
        self.seg, self.embed_rows, self.keep = seg, embed_rows, keep
        self.decoder_tokens, self.match_dim = decoder_tokens, match_dim
        h, w = seg.spec.crop
        self.policy = nn.Linear(3 * (h // 8) * (w // 8), 4)

    def forward(self, img):
        seg, enc, p = self.seg, self.seg.encoder, self.seg.spec.patch_size
        B = img.shape[0]
        gh, gw = seg.spec.grid
        unused = self.policy(img[:, :, ::8, ::8].flatten(1)).sum()  # outputs must be used, or tracing drops them
        x = enc.patch_embed.proj(img[:, :, : self.embed_rows * p]).flatten(2).transpose(1, 2)
        x = torch.cat([enc.cls_token.expand(B, -1, -1), x], dim=1) + enc.pos_embed[:, : 1 + x.shape[1]]
        for blk, keep in zip(enc.blocks, self.keep):
            x = x + blk.attn(blk.norm1(x))
            a, b = x[:, ::2, : self.match_dim], x[:, 1::2, : self.match_dim]
            unused = unused + (a @ b.transpose(1, 2)).sum()  # matching scores
            x = x[:, :keep]
            x = x + blk.mlp(blk.norm2(x))
        x = enc.norm(x) + 0 * unused  # element-wise ops and sums are not counted
        masks = seg.decoder(x[:, 1: 1 + self.decoder_tokens])  # (B, N_d, K)
        idx = torch.arange(gh * gw) % self.decoder_tokens  # every grid cell takes a token's row
        grid = masks[:, idx].transpose(1, 2).reshape(B, -1, gh, gw)
        return F.interpolate(grid, size=img.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", ["dense", "pruned"])
def test_analytic_general_token_counts_equal_fvcore(name):
    spec = TINY_SPECS[name]  # 4x4 grid, 3 or 2 blocks
    gh, gw = spec.grid
    embed_rows = 3
    n0 = 1 + embed_rows * gw  # 13 tokens enter block 0
    keep = [11, 8, 6][: spec.depth]
    n_in = [n0] + keep[:-1]
    match_dim = 5
    model = ShrinkingSegmenter(build_segmenter(spec), embed_rows, keep, decoder_tokens=4, match_dim=match_dim)
    traced = count_gmacs(model, torch.randn(1, 3, *spec.crop))
    h, w = spec.crop
    analytic = analytic_gmacs(
        spec, tokens_out=keep, decoder_tokens=4, embed_patches=embed_rows * gw,
        match_macs=[bipartite_match_macs(n, match_dim) for n in n_in],
        extra_macs=3 * (h // 8) * (w // 8) * 4,
    )
    assert traced == pytest.approx(analytic, rel=1e-9)
    # the same with tokens_in spelled out
    assert analytic_gmacs(spec, tokens_in=n_in, tokens_out=keep, decoder_tokens=4, embed_patches=embed_rows * gw,
                          match_macs=[bipartite_match_macs(n, match_dim) for n in n_in],
                          extra_macs=3 * (h // 8) * (w // 8) * 4) == pytest.approx(analytic, rel=1e-12)


def test_analytic_defaults_and_checks():
    spec = TINY_SPECS["dense"]
    n = 1 + 16
    assert analytic_gmacs(spec, tokens_in=n) == analytic_gmacs(spec) == analytic_gmacs(spec, tokens_out=[n, n])
    assert analytic_gmacs(spec, tokens_out=[10, 5]) < analytic_gmacs(spec, tokens_out=[10, 10]) < analytic_gmacs(spec)
    assert analytic_gmacs(spec, extra_macs=1e9) == pytest.approx(analytic_gmacs(spec) + 1)
    with pytest.raises(ValueError, match="2 blocks"):
        analytic_gmacs(spec, tokens_out=[10, 5, 3])
    with pytest.raises(ValueError, match="negative"):
        analytic_gmacs(spec, tokens_in=[10, -1])
    assert bipartite_match_macs(7, 3) == 4 * 3 * 3


def test_dense_vit_block_matches_textbook_formula():
    """docs/methods.md §7.1: a dense block costs 12·N·E² + 2·N²·E + 10·N·E."""
    spec = spec_from_timm("vit_small_patch16_384", 150, 512)
    N, E = 1 + 32 * 32, 384
    one_block_more = SegmenterSpec(**{**spec.to_dict(), "depth": 13})
    delta = (analytic_gmacs(one_block_more) - analytic_gmacs(spec)) * 1e9
    assert delta == pytest.approx(12 * N * E * E + 2 * N * N * E + 10 * N * E, rel=1e-12)


PUBLISHED = [  # (timm name, classes, crop, GFLOPs printed by the Segmenter/ALGM/CTS READMEs, docs/methods.md §7.1)
    ("vit_tiny_patch16_384", 150, 512, 12.8),
    ("vit_small_patch16_384", 150, 512, 38.6),
    ("vit_base_patch16_384", 150, 512, 129.6),
    ("vit_small_patch16_384", 19, 768, 116.0),
]


@pytest.mark.parametrize("name,classes,crop,published", PUBLISHED)
def test_analytic_reproduces_published_gflops(name, classes, crop, published):
    assert analytic_gmacs(spec_from_timm(name, classes, crop)) == pytest.approx(published, rel=0.01)


def test_fvcore_reproduces_published_gflops():
    """Traced at full size (a few seconds each): ViT-T on ADE20K and ViT-S on Cityscapes."""
    for name, classes, crop, published in (PUBLISHED[0], PUBLISHED[3]):
        spec = spec_from_timm(name, classes, crop)
        traced = count_gmacs(build_segmenter(spec), torch.zeros(1, 3, crop, crop))
        assert traced == pytest.approx(published, rel=0.01)
        assert traced == pytest.approx(analytic_gmacs(spec), rel=1e-9)


def run_cli(argv, capsys):
    assert cli(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_flops_backbone(capsys):
    out = run_cli(["flops", "--backbone", "vit_tiny_patch16_384", "--num-classes", "150", "--crop", "512"], capsys)
    assert out["gflops"] == pytest.approx(12.8, rel=0.01)
    assert out["gmacs"] == out["gflops"] and out["gflops_std"] == 0.0
    assert out["analytic_gflops"] == pytest.approx(out["gflops"], rel=1e-6)
    assert "multiply-add" in out["convention"]
    assert out["method"] == "dense" and out["crop"] == [512, 512] and out["num_classes"] == 150
    assert out["params_m"] > 5


def test_cli_flops_saved_pruned_model_and_arch(tmp_path, capsys):
    spec = TINY_SPECS["pruned"]
    path = tmp_path / "nvit-50.safetensors"
    save_model(build_segmenter(spec), path)
    out = run_cli(["flops", "--model", str(path), "--out", str(tmp_path / "f.json")], capsys)
    assert out["gflops"] == pytest.approx(analytic_gmacs(spec), rel=1e-5)
    assert json.loads((tmp_path / "f.json").read_text())["gflops"] == out["gflops"]
    arch = json.dumps({"patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3})
    out = run_cli(["flops", "--arch", arch, "--num-classes", "5", "--crop", "64", "--method", "dense"], capsys)
    assert out["gflops"] == pytest.approx(analytic_gmacs(TINY_SPECS["dense"]), rel=1e-5)


def test_cli_flops_bad_input(tmp_path, capsys):
    assert cli(["flops", "--backbone", "vit_tiny_patch16_384", "--num-classes", "5"]) == 2
    assert "--crop" in capsys.readouterr().err
    assert cli(["flops", "--backbone", "vit_tiny_patch16_384", "--num-classes", "5", "--crop", "64",
                "--method", "no-such-method"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli(["flops", "--backbone", "vit_tiny_patch16_384", "--num-classes", "5", "--crop", "64",
                "--knob", "{not json"]) == 2
    assert "JSON" in capsys.readouterr().err
    assert math.isfinite(analytic_gmacs(TINY_SPECS["dense"]))


def test_cli_flops_and_bench_on_calibration_images(tmp_path, capsys, synthetic_ade20k):
    """With --calib-root every calibration image is counted (mean and std reported); bench times the first."""
    pytest.importorskip("segcompress.data.datasets")
    root = synthetic_ade20k  # calibrates on its val images
    model = tmp_path / "dense.safetensors"
    save_model(build_segmenter(TINY_SPECS["dense"]), model)
    calib = ["--calib-root", str(root), "--calib-layout", "ade20k", "--calib-images", "2"]
    out = run_cli(["flops", "--model", str(model), *calib], capsys)
    assert out["images"] == "calibration" and out["num_images"] == 2
    assert out["gflops"] == pytest.approx(analytic_gmacs(TINY_SPECS["dense"]), rel=1e-9) and out["gflops_std"] == 0
    out = run_cli(["bench", "--model", str(model), "--batch", "2", "--warmup", "0", "--repeats", "1",
                   "--allocator", "default", *calib], capsys)
    assert out["images"] == "calibration" and out["images_per_s"] > 0
