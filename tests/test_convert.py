"""Importing released Segmenter checkpoints (mmsegmentation and the original code's format)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from segcompress.cli import main as cli
from segcompress.convert import (
    import_mmseg, import_segmenter, load_torch_checkpoint, load_variant, resize_pos_embed, spec_from_variant,
)
from segcompress.models.checkpoint import load_model

torch.set_num_threads(1)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Make every parameter random (LayerNorms around 1, biases non-zero), so nothing is trivially equal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# ---------------------------------------------------------------------------------------------
# mmsegmentation: compare with mmseg's own Segmenter, built from the config mmseg ships


MMSEG_CROP, MMSEG_CLASSES = 64, 5


@pytest.fixture(scope="module")
def mmseg_model():
    """mmseg's ViT-T Segmenter (shipped config, random weights), at a 64x64 crop with 5 classes."""
    mmseg = pytest.importorskip("mmseg")
    from mmengine.config import Config
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(
        Path(mmseg.__file__).parent / ".mim/configs/segmenter/segmenter_vit-t_mask_8xb1-160k_ade20k-512x512.py")
    cfg.model.pretrained = None
    cfg.model.backbone.img_size = (MMSEG_CROP, MMSEG_CROP)
    cfg.model.data_preprocessor.size = (MMSEG_CROP, MMSEG_CROP)
    cfg.model.decode_head.num_classes = MMSEG_CLASSES
    model = MODELS.build(cfg.model).eval()
    perturb_(model)
    return model


@pytest.fixture(scope="module")
def mmseg_checkpoint(mmseg_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("mmseg") / "segmenter_vit-t.pth"
    meta = {"mmseg_version": "1.2.2", "epoch": 64, "iter": 160000, "dataset_meta": {"classes": ["a", "b"]}}
    torch.save({"meta": meta, "state_dict": mmseg_model.state_dict()}, path)
    return path


def masks_of(model, x):
    """Our mask logits on the patch grid, before upsampling (what mmseg's mode='tensor' returns)."""
    return model.decode(model.forward_features(x), model.grid_of(x))


def test_mmseg_state_dict_names(mmseg_model):
    """The key names the converter relies on, read off mmseg's module (backbone has no patch bias)."""
    keys = set(mmseg_model.state_dict())
    for k in ("backbone.patch_embed.projection.weight", "backbone.layers.0.attn.attn.in_proj_weight",
              "backbone.layers.0.attn.attn.out_proj.weight", "backbone.layers.0.ffn.layers.0.0.weight",
              "backbone.layers.0.ffn.layers.1.weight", "backbone.layers.11.ln2.bias", "backbone.ln1.weight",
              "decode_head.dec_proj.weight", "decode_head.layers.1.ln1.weight", "decode_head.cls_emb",
              "decode_head.patch_proj.weight", "decode_head.classes_proj.weight", "decode_head.decoder_norm.bias",
              "decode_head.mask_norm.weight"):
        assert k in keys, k
    assert "backbone.patch_embed.projection.bias" not in keys


def test_mmseg_import_matches_mmseg_logits(mmseg_model, mmseg_checkpoint, tmp_path, capsys):
    out = tmp_path / "models" / "dense.safetensors"
    assert cli(["convert", "--format", "mmseg", "--checkpoint", str(mmseg_checkpoint), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["embed_dim"] == 192 and summary["num_heads"] == 3 and summary["depth"] == 12
    model = load_model(out).eval()
    spec = model.spec
    assert spec.num_classes == MMSEG_CLASSES and spec.crop == (MMSEG_CROP, MMSEG_CROP)
    assert spec.norm_eps == 1e-6 and spec.decoder_heads == 3 and spec.decoder_layers == 2
    x = torch.randn(2, 3, MMSEG_CROP, MMSEG_CROP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = mmseg_model(x, mode="tensor")
        ours = masks_of(model, x)
    assert ours.shape == theirs.shape == (2, MMSEG_CLASSES, 4, 4)
    assert theirs.abs().max() > 0.5  # not a degenerate output
    torch.testing.assert_close(ours, theirs, atol=5e-5, rtol=1e-5)
    # in float64 the two computations agree to rounding: the same function, not just a close one
    with torch.no_grad():
        theirs64 = mmseg_model.double()(x.double(), mode="tensor")
        ours64 = masks_of(model.double(), x.double())
    mmseg_model.float()
    torch.testing.assert_close(ours64, theirs64, atol=1e-10, rtol=0)


def test_mmseg_import_resizes_position_embeddings(mmseg_model, mmseg_checkpoint):
    """Built for a 96 crop, it matches mmseg's own on-the-fly bicubic resize at 96."""
    model = import_mmseg(mmseg_checkpoint, crop=96).double()
    assert model.spec.crop == (96, 96)
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        theirs = mmseg_model.double()(x, mode="tensor")
        ours = masks_of(model, x)
    mmseg_model.float()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)  # pos embed resized in float32 here


def test_mmseg_import_checks(mmseg_checkpoint):
    with pytest.raises(ValueError, match="class embeddings"):
        import_mmseg(mmseg_checkpoint, num_classes=150)
    with pytest.raises(ValueError, match="timm model vit_small"):
        import_mmseg(mmseg_checkpoint, backbone="vit_small_patch16_384")
    model = import_mmseg(mmseg_checkpoint, backbone="vit_tiny_patch16_384")
    assert model.spec.backbone == "vit_tiny_patch16_384" and model.spec.norm_eps == 1e-6


# ---------------------------------------------------------------------------------------------
# the original code (rstrudel/segmenter): an independent reference forward on the original names
#
# The original code cannot run in this environment (it needs einops and an old timm), so this
# reference re-implements, from the original's documented structure (segm/model/{vit,blocks,
# decoder,segmenter}.py), the forward pass as plain functions of the original state dict. The
# test proves that the converter maps every original tensor to the place the original forward
# uses it, with the original's LayerNorm eps (1e-5), attention scale, projection orientation and
# bilinear position-embedding resize; it cannot catch a misreading of the original shared by the
# reference and the converter.

D, HEADS, DEPTH, PATCH, CLASSES, CROP = 128, 2, 3, 16, 7, 64
EPS = 1e-5  # nn.LayerNorm default, used throughout the original code


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the original code's names and shapes (ViT with an ImageNet head)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, mean=0.0):
        return mean + 0.1 * torch.randn(*shape, generator=gen)

    sd = {"encoder.cls_token": r(1, 1, D), "encoder.pos_embed": r(1, 1 + (CROP // PATCH) ** 2, D),
          "encoder.patch_embed.proj.weight": r(D, 3, PATCH, PATCH) / 4, "encoder.patch_embed.proj.bias": r(D),
          "encoder.norm.weight": r(D, mean=1), "encoder.norm.bias": r(D),
          "encoder.head.weight": r(1000, D), "encoder.head.bias": r(1000),
          "decoder.cls_emb": r(1, CLASSES, D), "decoder.proj_dec.weight": r(D, D), "decoder.proj_dec.bias": r(D),
          "decoder.proj_patch": r(D, D), "decoder.proj_classes": r(D, D),
          "decoder.decoder_norm.weight": r(D, mean=1), "decoder.decoder_norm.bias": r(D),
          "decoder.mask_norm.weight": r(CLASSES, mean=1), "decoder.mask_norm.bias": r(CLASSES)}
    blocks = [f"encoder.blocks.{i}" for i in range(DEPTH)] + [f"decoder.blocks.{i}" for i in range(2)]
    for b in blocks:
        sd.update({f"{b}.norm1.weight": r(D, mean=1), f"{b}.norm1.bias": r(D),
                   f"{b}.attn.qkv.weight": r(3 * D, D), f"{b}.attn.qkv.bias": r(3 * D),
                   f"{b}.attn.proj.weight": r(D, D), f"{b}.attn.proj.bias": r(D),
                   f"{b}.norm2.weight": r(D, mean=1), f"{b}.norm2.bias": r(D),
                   f"{b}.mlp.fc1.weight": r(4 * D, D), f"{b}.mlp.fc1.bias": r(4 * D),
                   f"{b}.mlp.fc2.weight": r(D, 4 * D), f"{b}.mlp.fc2.bias": r(D)})
    return sd


def reference_forward(sd: dict[str, torch.Tensor], img: torch.Tensor, heads: int, dec_heads: int) -> torch.Tensor:
    """The original Segmenter forward, written from its structure, on the original key names."""

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)

    def lin(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def block(x, name, h):
        B, N, C = x.shape
        qkv = lin(ln(x, f"{name}.norm1"), f"{name}.attn.qkv").reshape(B, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(dim=-1)
        x = x + lin((attn @ v).transpose(1, 2).reshape(B, N, C), f"{name}.attn.proj")
        y = lin(F.gelu(lin(ln(x, f"{name}.norm2"), f"{name}.mlp.fc1")), f"{name}.mlp.fc2")
        return x + y

    B, _, H, W = img.shape
    gh, gw = H // PATCH, W // PATCH
    x = F.conv2d(img, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd["encoder.cls_token"].expand(B, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["encoder.pos_embed"]
    if pos.shape[1] != x.shape[1]:  # resize_pos_embed: bilinear from the square training grid
        old = int(math.isqrt(pos.shape[1] - 1))
        grid = pos[0, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear").permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        pos = torch.cat([pos[:, :1], grid], dim=1)
    x = x + pos
    for i in range(DEPTH):
        x = block(x, f"encoder.blocks.{i}", heads)
    x = ln(x, "encoder.norm")[:, 1:]
    x = torch.cat([lin(x, "decoder.proj_dec"), sd["decoder.cls_emb"].expand(B, -1, -1)], dim=1)
    for i in range(2):
        x = block(x, f"decoder.blocks.{i}", dec_heads)
    x = ln(x, "decoder.decoder_norm")
    patches, classes = x[:, :-CLASSES] @ sd["decoder.proj_patch"], x[:, -CLASSES:] @ sd["decoder.proj_classes"]
    patches = patches / patches.norm(dim=-1, keepdim=True)
    classes = classes / classes.norm(dim=-1, keepdim=True)
    masks = ln(patches @ classes.transpose(1, 2), "decoder.mask_norm")
    masks = masks.transpose(1, 2).reshape(B, CLASSES, gh, gw)
    return F.interpolate(masks, size=(H, W), mode="bilinear")


def write_variant(path: Path, **net_overrides) -> None:
    """A variant.yml as ``segm/train.py`` writes it (``yaml.dump``, image_size a tuple)."""
    net = dict(backbone="vit_custom_patch16", d_model=D, n_heads=HEADS, n_layers=DEPTH, patch_size=PATCH,
               image_size=(CROP, CROP), n_cls=CLASSES, normalization="vit", distilled=False, dropout=0.0,
               drop_path_rate=0.1, decoder=dict(name="mask_transformer", n_layers=2, dropout=0.1, drop_path_rate=0.0))
    net.update(net_overrides)
    variant = dict(net_kwargs=net, dataset_kwargs=dict(dataset="ade20k", crop_size=CROP, image_size=CROP),
                   inference_kwargs=dict(im_size=CROP, window_size=CROP, window_stride=CROP - 32), version="normal")
    path.write_text(yaml.dump(variant))


@pytest.fixture()
def original_checkpoint(tmp_path):
    folder = tmp_path / "seg_custom_mask"
    folder.mkdir()
    sd = original_state_dict()
    torch.save({"model": sd, "n_cls": CLASSES, "epoch": 63, "optimizer": {"state": {}, "param_groups": []}},
               folder / "checkpoint.pth")
    write_variant(folder / "variant.yml")
    return folder / "checkpoint.pth", sd


def test_variant_yml_with_python_tuple_reads_safely(original_checkpoint):
    ckpt, _ = original_checkpoint
    text = (ckpt.parent / "variant.yml").read_text()
    assert "!!python/tuple" in text  # what yaml.dump writes for the original's image_size
    variant = load_variant(ckpt.parent / "variant.yml")
    assert variant["net_kwargs"]["image_size"] == (CROP, CROP)
    spec = spec_from_variant(variant)
    assert (spec.embed_dim, spec.num_heads, spec.depth, spec.decoder_heads, spec.norm_eps) == (D, HEADS, DEPTH, 2, EPS)


@pytest.mark.parametrize("crop", [CROP, 96])
def test_original_import_matches_reference_forward(original_checkpoint, tmp_path, capsys, crop):
    ckpt, sd = original_checkpoint
    out = tmp_path / f"seg-{crop}.safetensors"
    assert cli(["convert", "--format", "segmenter", "--checkpoint", str(ckpt), "--crop", str(crop),
                "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["norm_eps"] == EPS
    model = load_model(out).double().eval()
    x = torch.randn(2, 3, crop, crop, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sd64 = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        ref = reference_forward(sd64, x, HEADS, D // 64)
        ours = model(x)
    assert ref.abs().max() > 0.5
    # same crop: the same function to float64 rounding; a resized grid differs only by the float32
    # rounding of the resized position embeddings stored in the converted file
    torch.testing.assert_close(ours, ref, atol=1e-10 if crop == CROP else 1e-5, rtol=0)


def test_original_import_without_variant_reads_the_weights(original_checkpoint):
    ckpt, sd = original_checkpoint
    (ckpt.parent / "variant.yml").unlink()
    model = import_segmenter(ckpt, num_heads=HEADS).double()
    assert model.spec.num_heads == HEADS and model.spec.norm_eps == EPS and model.spec.crop == (CROP, CROP)
    x = torch.randn(1, 3, CROP, CROP, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward({k: v.double() for k, v in sd.items()}, x, HEADS, 2),
                                   atol=1e-10, rtol=0)


@pytest.mark.parametrize("override,message", [
    ({"distilled": True}, "distilled"),
    ({"normalization": "deit"}, "normalization"),
    ({"decoder": {"name": "linear"}}, "not supported"),
])
def test_original_unsupported_variants(tmp_path, override, message):
    write_variant(tmp_path / "variant.yml", **override)
    with pytest.raises(ValueError, match=message):
        spec_from_variant(load_variant(tmp_path / "variant.yml"))


# ---------------------------------------------------------------------------------------------
# safety and helpers


class Payload:
    """Any object other than tensors and containers; torch.load(weights_only=True) must refuse it."""


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": Payload()}, path)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        load_torch_checkpoint(path)
    out = tmp_path / "x.safetensors"
    assert cli(["convert", "--format", "mmseg", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert "refuses to unpickle" in capsys.readouterr().err
    assert not out.exists()


def test_wrong_format_is_a_clear_error(original_checkpoint, tmp_path, capsys):
    ckpt, _ = original_checkpoint
    argv = ["convert", "--format", "mmseg", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.safetensors")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "--format" in err


def test_resize_pos_embed_keeps_class_token_and_identity():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, (4, 4)) is pos
    big = resize_pos_embed(pos, (6, 8))
    assert big.shape == (1, 1 + 48, 8) and torch.equal(big[:, 0], pos[:, 0])
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
