"""Segmenter model, spec and checkpoint files."""

import json
import subprocess
import sys
from functools import partial

import pytest
import torch

from segcompress.models import BlockDims, SegmenterSpec, build_segmenter, spec_from_timm, unfused_attention
from segcompress.models.checkpoint import load_model, save_model, spec_path
from segcompress.models.spec import spec_from_arch
from tiny_segmenter import SEGMENTER_DROPOUT
from tiny_segmenter import tiny_spec as _tiny_spec

torch.set_num_threads(1)


tiny_spec = partial(_tiny_spec, num_classes=7, **SEGMENTER_DROPOUT)  # 32 px, 8 px patches, 2 blocks


def test_forward_shape_and_decoder_defaults():
    spec = tiny_spec()
    assert spec.decoder_dim == 32 and spec.decoder_heads == 1 and spec.grid == (4, 4)
    model = build_segmenter(spec).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7, 32, 32)


@pytest.mark.parametrize("batch", [1, 3])
def test_logits_are_channels_last_and_equal_the_nchw_upsampling(batch):
    """Classes fastest in memory at every batch size (CPU upsampling's fast path), same values."""
    model = build_segmenter(tiny_spec()).eval()
    img = torch.randn(batch, 3, 32, 32)
    with torch.inference_mode():
        out = model(img)
        masks = model.decode(model.forward_features(img), model.grid_of(img))
        ref = torch.nn.functional.interpolate(masks.contiguous(), size=(32, 32), mode="bilinear", align_corners=False)
    assert out.stride()[1] == 1 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5)


def test_non_square_crop():
    model = build_segmenter(tiny_spec(img_size=[32, 48])).eval()
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 7, 32, 48)


def test_unfused_attention_is_numerically_the_same():
    torch.manual_seed(0)
    model = build_segmenter(tiny_spec()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        with unfused_attention(model):
            plain = model(x)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_encoder_matches_timm_vit_with_the_same_weights():
    """Our Attention has timm's parameter layout: timm weights give the same features."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    spec = tiny_spec()
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    model = build_segmenter(spec).eval()
    model.encoder.load_state_dict(vit.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), vit.forward_features(x)[:, 1:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name, what", [("deit3_small_patch16_224", "LayerScale"),
                                        ("vit_small_patch14_reg4_dinov2", "register tokens")])
def test_timm_variants_the_encoder_lacks_are_refused_by_name(name, what):
    with pytest.raises(ValueError, match=what):
        spec_from_timm(name, 3, 224)


def test_timm_spec_takes_the_norm_epsilon():
    assert spec_from_timm("vit_small_patch16_384", 3, 384).norm_eps == 1e-6


def test_decoder_block_matches_timm_block_with_the_same_weights():
    """The decoder's blocks are timm's Block (same names, same computation)."""
    from timm.models.vision_transformer import Block as TimmBlock

    torch.manual_seed(0)
    model = build_segmenter(tiny_spec()).eval()
    ours = model.decoder.blocks[0]
    ref = TimmBlock(32, 1, 4.0, qkv_bias=True, norm_layer=torch.nn.LayerNorm).eval()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def test_a_dense_job_does_not_import_timm(tmp_path):
    """timm (with torchvision and torch._dynamo, seconds per process) is imported only where needed:
    building, saving, loading and running a model from a spec does not."""
    code = (
        "import sys, torch\n"
        "from segcompress.models.checkpoint import load_model, save_model\n"
        "from segcompress.models.segmenter import build_segmenter\n"
        "from segcompress.models.spec import spec_from_arch\n"
        "spec, _ = spec_from_arch({'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}, 5, 32)\n"
        f"save_model(build_segmenter(spec), {str(tmp_path / 'm.safetensors')!r})\n"
        f"load_model({str(tmp_path / 'm.safetensors')!r})(torch.randn(1, 3, 32, 32))\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(tiny_spec()).eval()
    path = tmp_path / "m" / "dense.safetensors"
    save_model(model, path)
    assert spec_path(path).is_file() and json.loads(spec_path(path).read_text())["embed_dim"] == 32
    loaded = load_model(path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not list(path.parent.glob(".*tmp"))  # atomic writes leave no temp files


def test_pruned_spec_builds_smaller_modules(tmp_path):
    blocks = [BlockDims(num_heads=1, qk_dim=8, v_dim=12, mlp_hidden=20), BlockDims(2, 16, 16, 64)]
    spec = tiny_spec(blocks=blocks, attn_scale=16 ** -0.5)
    model = build_segmenter(spec).eval()
    attn = model.encoder.blocks[0].attn
    assert attn.qkv.weight.shape == (1 * (2 * 8 + 12), 32) and attn.proj.weight.shape == (32, 12)
    assert attn.scale == 16 ** -0.5
    assert model.encoder.blocks[0].mlp.fc1.weight.shape == (20, 32)
    save_model(model, tmp_path / "p.safetensors")
    reloaded = load_model(tmp_path / "p.safetensors").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))
        # fused attention pads q/k or v to one width: same numbers as the explicit matmuls
        fused = model(x)
        with unfused_attention(model):
            torch.testing.assert_close(fused, model(x), atol=1e-5, rtol=1e-4)


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        SegmenterSpec.from_dict({"num_classes": 3, "embed_dims": 4})
    with pytest.raises(ValueError, match="depth 2 but 1 block"):
        tiny_spec(blocks=[BlockDims(1, 8, 8, 8)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        SegmenterSpec.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="unknown backbone key"):
        spec_from_arch({"embed_dim": 32, "depht": 2}, 3, 32)
    with pytest.raises(ValueError, match="missing: depth"):
        spec_from_arch({"patch_size": 8, "embed_dim": 32, "num_heads": 2}, 3, 32)


def test_spec_from_timm_reads_widths():
    spec = spec_from_timm("vit_base_patch16_384", num_classes=19, img_size=768)
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size) == (768, 12, 12, 16)
    assert spec.grid == (48, 48) and spec.decoder_heads == 12


def test_checkpoint_refuses_a_tampered_spec_and_garbage_weights(tmp_path):
    """A spec edited after saving so that shapes still fit is refused, naming the changed key; a
    truncated or garbage weights file is one clear error naming it."""
    model = build_segmenter(tiny_spec())
    path = tmp_path / "dense.safetensors"
    save_model(model, path)
    spec = json.loads(spec_path(path).read_text())
    spec["norm_eps"] = 1e-3  # every shape still fits
    spec_path(path).write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="norm_eps"):
        load_model(path)
    for cut in (100, -100):  # a broken header; the data cut short
        save_model(model, path)
        path.write_bytes(path.read_bytes()[:cut])
        with pytest.raises(ValueError, match=f"{path}: not a readable safetensors file"):
            load_model(path)
