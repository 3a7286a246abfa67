"""Import released Segmenter checkpoints into this project's model.

Two source formats:

* ``mmseg``: mmsegmentation (0.x and 1.x) ``EncoderDecoder`` with a ``VisionTransformer``
  backbone and a ``SegmenterMaskTransformerHead`` (``state_dict`` keys ``backbone.*`` and
  ``decode_head.*``; attention is ``nn.MultiheadAttention`` with a packed ``in_proj``; the patch
  embedding has no bias; backbone LayerNorm eps 1e-6, decoder eps 1e-5).
* ``segmenter``: the original code (rstrudel/segmenter): ``checkpoint.pth`` holding
  ``{"model": state_dict, ...}`` plus ``variant.yml`` beside it. Its module names are the same as
  ours (timm-style ``encoder.blocks.i.attn.qkv`` ...), its ViT's LayerNorms use eps 1e-5 and it
  carries an unused ImageNet ``encoder.head``.

Files are read with ``torch.load(weights_only=True)``: nothing but tensors and plain containers
is unpickled, so a checkpoint holding other Python objects is refused with a clear error. Position
embeddings are resized (bilinear for the original format, bicubic for mmseg, as each code base
does) when the requested crop has another patch grid than the checkpoint.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from segcompress.models.segmenter import Segmenter, build_segmenter
from segcompress.models.spec import SegmenterSpec, spec_from_timm

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

FORMATS = ("mmseg", "segmenter")

MMSEG_NORM_EPS = 1e-6  # mmseg Segmenter configs: backbone norm_cfg LN eps=1e-6
SEGMENTER_NORM_EPS = 1e-5  # original code: nn.LayerNorm defaults
VIT_MEAN_STD = 127.5  # "vit" normalisation, the only one the pipeline feeds


# ---------------------------------------------------------------------------------------------
# reading files


def load_torch_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``.pth`` file with ``torch.load(weights_only=True)`` (tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path}: refuses to unpickle non-tensor objects ({first}); re-save only the weights, "
            "e.g. torch.save({'state_dict': ckpt['state_dict']}, 'weights.pth') in a trusted session"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict in the checkpoint, found {type(obj).__name__}")
    return obj


def state_dict_of(obj: Mapping[str, Any], keys: tuple[str, ...] = ("state_dict", "model")) -> StateDict:
    """The tensor dict inside a checkpoint (under ``state_dict``/``model``, or the dict itself)."""
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"no state dict in the checkpoint (looked under {', '.join(map(repr, keys))} and the "
                         f"top level; found keys {sorted(map(str, obj))[:8]}): wrong --format?")
    return state


def _variant_loader() -> type:
    """A ``yaml.SafeLoader`` that also reads the ``!!python/tuple`` tags ``yaml.dump`` writes."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tuple_ctor(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
        return tuple(loader.construct_sequence(node))  # type: ignore[arg-type]

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", tuple_ctor)
    return Loader


def load_variant(path: str | Path) -> dict[str, Any]:
    """Read the original code's ``variant.yml`` (safe YAML plus tuples)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: variant.yml not found (written next to checkpoint.pth by segm.train)")
    try:
        data = yaml.load(path.read_text(), Loader=_variant_loader())  # noqa: S506 - safe loader subclass
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("net_kwargs"), dict):
        raise ValueError(f"{path}: not a Segmenter variant.yml (no 'net_kwargs' mapping)")
    return data


# ---------------------------------------------------------------------------------------------
# position embeddings


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                     mode: str = "bilinear", num_prefix: int = 1) -> torch.Tensor:
    """Resize position embeddings (1, prefix + h*w, C) to a new patch grid.

    ``old_grid`` defaults to a square grid. The prefix (class token) embeddings are kept.
    """
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    n = patches.shape[1]
    if old_grid is None:
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"position embeddings of {n} patches are not a square grid; give the grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(grid):
        return pos
    c = pos.shape[-1]
    x = patches.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=grid, mode=mode, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], c).to(pos.dtype)
    return torch.cat([prefix, x], dim=1)


def _square_grid(pos: torch.Tensor, num_prefix: int = 1) -> tuple[int, int]:
    n = pos.shape[1] - num_prefix
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"cannot infer the training crop: {n} position embeddings are not a square grid; give --crop")
    return side, side


# ---------------------------------------------------------------------------------------------
# specs


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in state if (m := pat.match(k))}
    if not idx or idx != set(range(max(idx) + 1)):
        raise ValueError(f"no consecutive '{prefix}<i>.' blocks in the checkpoint")
    return max(idx) + 1


def _spec_from_widths(
        *,
        num_classes: int,
        crop: int | list[int],
        patch_size: int,
        embed_dim: int,
        depth: int,
        mlp_hidden: int,
        decoder_dim: int,
        decoder_layers: int,
        norm_eps: float,
        num_heads: int | None,
        decoder_heads: int | None,
        backbone: str | None,
        **extra: Any,
) -> SegmenterSpec:
    """A spec from widths read off a checkpoint; heads default to width // 64 (every Segmenter)."""
    if backbone is not None:
        spec = spec_from_timm(backbone, num_classes, crop, norm_eps=norm_eps, decoder_dim=decoder_dim,
                              decoder_heads=decoder_heads, decoder_layers=decoder_layers, **extra)
        found = (spec.patch_size, spec.embed_dim, spec.depth, int(spec.embed_dim * spec.mlp_ratio))
        if found != (patch_size, embed_dim, depth, mlp_hidden):
            raise ValueError(
                f"timm model {backbone} has (patch, width, depth, mlp) {found} but the checkpoint has "
                f"{(patch_size, embed_dim, depth, mlp_hidden)}"
            )
        if num_heads is not None and num_heads != spec.num_heads:
            raise ValueError(f"--num-heads {num_heads} contradicts timm model {backbone} ({spec.num_heads} heads)")
        return spec
    return SegmenterSpec(
        num_classes=num_classes, img_size=crop, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads or max(1, embed_dim // 64), mlp_ratio=mlp_hidden / embed_dim, norm_eps=norm_eps,
        decoder_dim=decoder_dim, decoder_heads=decoder_heads, decoder_layers=decoder_layers, **extra,
    )


def _check_num_classes(found: int, given: int | None) -> int:
    if given is not None and given != found:
        raise ValueError(f"--num-classes {given} but the checkpoint's decoder has {found} class embeddings")
    return found


def spec_from_mmseg(
        state: Mapping[str, torch.Tensor],
        num_classes: int | None = None,
        crop: int | list[int] | None = None,
        backbone: str | None = None,
        num_heads: int | None = None,
        decoder_heads: int | None = None,
) -> SegmenterSpec:
    """Spec of an mmseg Segmenter state dict (``backbone.*``, ``decode_head.*`` keys).

    Widths, depth, patch size, classes and (without ``crop``) the training crop are read off the
    tensors; heads, which tensors do not show, default to width // 64 as in every Segmenter config,
    or come from ``backbone`` (a timm name) or ``num_heads``.
    """
    try:
        w_patch = state["backbone.patch_embed.projection.weight"]
        pos = state["backbone.pos_embed"]
        cls_emb = state["decode_head.cls_emb"]
        dec_proj = state["decode_head.dec_proj.weight"]
        ffn = state["backbone.layers.0.ffn.layers.0.0.weight"]
    except KeyError as e:
        raise ValueError(f"not an mmseg Segmenter checkpoint: missing {e}") from None
    patch = w_patch.shape[-1]
    if crop is None:
        gh, gw = _square_grid(pos)
        crop = gh * patch if gh == gw else [gh * patch, gw * patch]
    return _spec_from_widths(
        num_classes=_check_num_classes(cls_emb.shape[1], num_classes), crop=crop, patch_size=patch,
        embed_dim=w_patch.shape[0], depth=_count_blocks(state, "backbone.layers."), mlp_hidden=ffn.shape[0],
        decoder_dim=dec_proj.shape[0], decoder_layers=_count_blocks(state, "decode_head.layers."),
        norm_eps=MMSEG_NORM_EPS, num_heads=num_heads, decoder_heads=decoder_heads, backbone=backbone,
    )


def spec_from_variant(
        variant: Mapping[str, Any],
        state: Mapping[str, torch.Tensor] | None = None,
        num_classes: int | None = None,
        crop: int | list[int] | None = None,
) -> SegmenterSpec:
    """Spec of an original-format model from its ``variant.yml`` (``net_kwargs``).

    Mirrors ``segm/model/factory.py``: MLP 4·d_model, decoder width d_model and heads d_model // 64.
    """
    net = dict(variant["net_kwargs"])
    dec = dict(net.get("decoder") or {})
    if dec.get("name", "mask_transformer") != "mask_transformer":
        raise ValueError(f"decoder {dec.get('name')!r} is not supported (only the mask transformer)")
    if net.get("distilled"):
        raise ValueError(f"distilled backbone {net.get('backbone')!r} (DeiT) is not supported")
    if net.get("normalization", "vit") != "vit":
        raise ValueError(
            f"normalization {net.get('normalization')!r} is not supported: the pipeline feeds 'vit'-normalised "
            "images (mean 0.5, std 0.5)"
        )
    try:
        d_model, image_size = int(net["d_model"]), net["image_size"]
        n_cls = int(net.get("n_cls") or state["decoder.cls_emb"].shape[1])  # type: ignore[index]
        img = list(image_size) if isinstance(image_size, (list, tuple)) else [image_size, image_size]
        if crop is None:
            crop = img[0] if img[0] == img[1] else img
        spec = SegmenterSpec(
            num_classes=_check_num_classes(n_cls, num_classes), img_size=crop, patch_size=int(net["patch_size"]),
            embed_dim=d_model, depth=int(net["n_layers"]), num_heads=int(net["n_heads"]), mlp_ratio=4.0,
            norm_eps=SEGMENTER_NORM_EPS, decoder_dim=d_model, decoder_heads=d_model // 64,
            decoder_layers=int(dec.get("n_layers", 2)), drop_path_rate=float(net.get("drop_path_rate", 0.1)),
            decoder_dropout=float(dec.get("dropout", 0.1)), backbone=net.get("backbone"),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"variant.yml net_kwargs lacks {e}") from None
    return spec


def spec_from_segmenter_state(
        state: Mapping[str, torch.Tensor],
        num_classes: int | None = None,
        crop: int | list[int] | None = None,
        backbone: str | None = None,
        num_heads: int | None = None,
) -> SegmenterSpec:
    """Spec of an original-format state dict without its ``variant.yml`` (widths from tensors)."""
    try:
        w_patch = state["encoder.patch_embed.proj.weight"]
        pos = state["encoder.pos_embed"]
        cls_emb = state["decoder.cls_emb"]
        fc1 = state["encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ValueError(f"not an original Segmenter checkpoint: missing {e}") from None
    patch = w_patch.shape[-1]
    if crop is None:
        gh, gw = _square_grid(pos)
        crop = gh * patch if gh == gw else [gh * patch, gw * patch]
    d = cls_emb.shape[-1]
    return _spec_from_widths(
        num_classes=_check_num_classes(cls_emb.shape[1], num_classes), crop=crop, patch_size=patch,
        embed_dim=w_patch.shape[0], depth=_count_blocks(state, "encoder.blocks."), mlp_hidden=fc1.shape[0],
        decoder_dim=d, decoder_layers=_count_blocks(state, "decoder.blocks."), norm_eps=SEGMENTER_NORM_EPS,
        num_heads=num_heads, decoder_heads=d // 64 or 1, backbone=backbone,
    )


# ---------------------------------------------------------------------------------------------
# key mapping


def _mmseg_layer(state: Mapping[str, torch.Tensor], src: str, dst: str) -> StateDict:
    """One mmseg ``TransformerEncoderLayer`` (``src``) as a timm-style block (``dst``)."""
    out: StateDict = {}
    for ours, theirs in (
            ("norm1", "ln1"), ("norm2", "ln2"), ("attn.qkv", "attn.attn.in_proj"), ("attn.proj", "attn.attn.out_proj"),
            ("mlp.fc1", "ffn.layers.0.0"), ("mlp.fc2", "ffn.layers.1"),
    ):
        for p in ("weight", "bias"):
            key = f"{src}.{theirs}_{p}" if theirs.endswith("in_proj") else f"{src}.{theirs}.{p}"
            out[f"{dst}.{ours}.{p}"] = state[key]
    return out


_MMSEG_IGNORED = re.compile(r"^(data_preprocessor\.|decode_head\.loss_decode\.|decode_head\.conv_seg\.)")


def convert_mmseg_state(state: Mapping[str, torch.Tensor], spec: SegmenterSpec) -> StateDict:
    """Map an mmseg Segmenter state dict onto this project's key names for ``spec``.

    Raises:
        ValueError: for keys that have no place in a Segmenter (another head, pre-norm, patch norm).
    """
    s = dict(state)
    for name in ("mean", "std"):
        t = s.get(f"data_preprocessor.{name}")
        if t is not None and not torch.allclose(t.float(), torch.full_like(t.float(), VIT_MEAN_STD)):
            raise ValueError(f"data_preprocessor.{name} is {t.flatten().tolist()}, the pipeline normalises with 127.5")
    out: StateDict = {}
    try:
        w = s["backbone.patch_embed.projection.weight"]
        out["encoder.patch_embed.proj.weight"] = w
        out["encoder.patch_embed.proj.bias"] = s.get(
            "backbone.patch_embed.projection.bias", torch.zeros(w.shape[0], dtype=w.dtype))  # mmseg: bias=False
        out["encoder.cls_token"] = s["backbone.cls_token"]
        out["encoder.pos_embed"] = resize_pos_embed(s["backbone.pos_embed"], spec.grid, mode="bicubic")
        for i in range(spec.depth):
            out.update(_mmseg_layer(s, f"backbone.layers.{i}", f"encoder.blocks.{i}"))
        out["encoder.norm.weight"] = s["backbone.ln1.weight"]
        out["encoder.norm.bias"] = s["backbone.ln1.bias"]
        dh = "decode_head"
        out["decoder.proj_dec.weight"] = s[f"{dh}.dec_proj.weight"]
        out["decoder.proj_dec.bias"] = s[f"{dh}.dec_proj.bias"]
        for i in range(spec.decoder_layers):
            out.update(_mmseg_layer(s, f"{dh}.layers.{i}", f"decoder.blocks.{i}"))
        out["decoder.cls_emb"] = s[f"{dh}.cls_emb"]
        out["decoder.proj_patch"] = s[f"{dh}.patch_proj.weight"].t().contiguous()  # Linear: x Wᵀ; ours: x P
        out["decoder.proj_classes"] = s[f"{dh}.classes_proj.weight"].t().contiguous()
        for norm in ("decoder_norm", "mask_norm"):
            out[f"decoder.{norm}.weight"] = s[f"{dh}.{norm}.weight"]
            out[f"decoder.{norm}.bias"] = s[f"{dh}.{norm}.bias"]
    except KeyError as e:
        raise ValueError(f"mmseg checkpoint lacks {e} (is it a Segmenter with a mask-transformer head?)") from None
    used = _mmseg_used_keys(spec)
    left = sorted(k for k in s if k not in used and not _MMSEG_IGNORED.match(k))
    if left:
        raise ValueError(f"mmseg checkpoint has weights a Segmenter does not use: {', '.join(left[:6])}"
                         + (" ..." if len(left) > 6 else ""))
    return out


def _mmseg_used_keys(spec: SegmenterSpec) -> set[str]:
    keys = {"backbone.patch_embed.projection.weight", "backbone.patch_embed.projection.bias", "backbone.cls_token",
            "backbone.pos_embed", "backbone.ln1.weight", "backbone.ln1.bias"}
    layer = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.attn.in_proj_weight", "attn.attn.in_proj_bias",
             "attn.attn.out_proj.weight", "attn.attn.out_proj.bias", "ffn.layers.0.0.weight", "ffn.layers.0.0.bias",
             "ffn.layers.1.weight", "ffn.layers.1.bias"]
    keys |= {f"backbone.layers.{i}.{k}" for i in range(spec.depth) for k in layer}
    keys |= {f"decode_head.layers.{i}.{k}" for i in range(spec.decoder_layers) for k in layer}
    keys |= {f"decode_head.{k}" for k in ("dec_proj.weight", "dec_proj.bias", "cls_emb", "patch_proj.weight",
                                          "classes_proj.weight", "decoder_norm.weight", "decoder_norm.bias",
                                          "mask_norm.weight", "mask_norm.bias")}
    return keys


_SEGMENTER_IGNORED = re.compile(r"^encoder\.(head|head_dist)\.")


def convert_segmenter_state(state: Mapping[str, torch.Tensor], spec: SegmenterSpec) -> StateDict:
    """Map an original-format state dict onto ours: same names, minus the ImageNet head.

    The position embeddings are resized bilinearly (as ``segm/model/utils.resize_pos_embed``)
    when ``spec``'s grid differs from the checkpoint's (square) grid.
    """
    if "encoder.dist_token" in state:
        raise ValueError("distilled (DeiT) backbones are not supported")
    if "decoder.head.weight" in state:
        raise ValueError("the linear decoder is not supported (only the mask transformer)")
    out = {k: v for k, v in state.items() if not _SEGMENTER_IGNORED.match(k)}
    if "encoder.pos_embed" not in out:
        raise ValueError("not an original Segmenter checkpoint: missing 'encoder.pos_embed'")
    out["encoder.pos_embed"] = resize_pos_embed(out["encoder.pos_embed"], spec.grid, mode="bilinear")
    return out


# ---------------------------------------------------------------------------------------------
# whole imports


@contextmanager
def _about(path: str | Path) -> Iterator[None]:
    """Prefix bad-input errors with the file they are about (one clear line for the CLI)."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: {e}") from None


def _load_into(spec: SegmenterSpec, state: StateDict) -> Segmenter:
    model = build_segmenter(spec)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    bad = [f"{k} {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state.items()
           if k in ours and ours[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ValueError(f"converted weights do not fit the spec (missing: {missing[:5]}, "
                         f"unexpected: {unexpected[:5]}, shape mismatch: {bad[:5]})")
    model.load_state_dict(state, strict=True)
    return model.eval()


def import_mmseg(
        checkpoint: str | Path,
        num_classes: int | None = None,
        crop: int | list[int] | None = None,
        backbone: str | None = None,
        num_heads: int | None = None,
        decoder_heads: int | None = None,
) -> Segmenter:
    """A Segmenter with the weights of an mmsegmentation Segmenter checkpoint (``.pth``)."""
    with _about(checkpoint):
        state = state_dict_of(load_torch_checkpoint(checkpoint), keys=("state_dict",))
        spec = spec_from_mmseg(state, num_classes, crop, backbone, num_heads, decoder_heads)
        return _load_into(spec, convert_mmseg_state(state, spec))


def import_segmenter(
        checkpoint: str | Path,
        variant: str | Path | None = None,
        num_classes: int | None = None,
        crop: int | list[int] | None = None,
        backbone: str | None = None,
        num_heads: int | None = None,
) -> Segmenter:
    """A Segmenter with the weights of an original-code ``checkpoint.pth``.

    ``variant`` defaults to ``variant.yml`` beside the checkpoint (as ``segm.model.factory.load_model``);
    without one, the architecture is read off the tensors (heads = width // 64 unless given).
    """
    checkpoint = Path(checkpoint)
    with _about(checkpoint):
        state = state_dict_of(load_torch_checkpoint(checkpoint), keys=("model",))
    variant_path = Path(variant) if variant is not None else checkpoint.parent / "variant.yml"
    if variant is not None or variant_path.is_file():
        log.info("architecture from %s", variant_path)
        with _about(variant_path):
            spec = spec_from_variant(load_variant(variant_path), state, num_classes, crop)
    else:
        log.info("no %s: architecture read off the weights", variant_path)
        with _about(checkpoint):
            spec = spec_from_segmenter_state(state, num_classes, crop, backbone, num_heads)
    with _about(checkpoint):
        return _load_into(spec, convert_segmenter_state(state, spec))


def import_checkpoint(fmt: str, checkpoint: str | Path, **kwargs: Any) -> Segmenter:
    """Dispatch on ``fmt`` (``mmseg`` or ``segmenter``); see :func:`import_mmseg`, :func:`import_segmenter`."""
    if fmt == "mmseg":
        if kwargs.pop("variant", None) is not None:
            raise ValueError("a variant.yml belongs to the original format (--format segmenter), not mmseg")
        return import_mmseg(checkpoint, **kwargs)
    if fmt == "segmenter":
        if kwargs.pop("decoder_heads", None) is not None:
            raise ValueError("the original format's decoder heads are fixed (width // 64)")
        return import_segmenter(checkpoint, **kwargs)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
