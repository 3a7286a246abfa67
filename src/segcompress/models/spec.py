"""Architecture spec of a Segmenter: everything needed to rebuild the model from its JSON file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BlockDims:
    """Per-block widths of an encoder block (differ from the defaults after structural pruning).

    Args:
        num_heads: attention heads.
        qk_dim: query/key width per head.
        v_dim: value width per head.
        mlp_hidden: hidden width of the MLP.
    """

    num_heads: int
    qk_dim: int
    v_dim: int
    mlp_hidden: int


@dataclass
class SegmenterSpec:
    """A Segmenter (ViT encoder + mask-transformer decoder), as written next to its weights.

    Args:
        num_classes: number of segmentation classes (150 for ADE20K, 19 for Cityscapes).
        img_size: training crop, ``S`` or ``[H, W]``; the model runs on crops of this size.
        patch_size: ViT patch size.
        embed_dim: encoder width E (the residual stream).
        depth: number of encoder blocks.
        num_heads: encoder heads (per-head width = embed_dim // num_heads unless ``blocks`` says).
        mlp_ratio: encoder MLP hidden = mlp_ratio * embed_dim unless ``blocks`` says.
        norm_eps: LayerNorm epsilon of the encoder (timm: 1e-6; original Segmenter code: 1e-5).
        decoder_dim: width D of the mask transformer (Segmenter: the encoder width).
        decoder_heads: decoder heads (Segmenter: D // 64).
        decoder_layers: decoder blocks (Segmenter: 2).
        drop_path_rate: stochastic depth of the encoder while training (Segmenter: 0.1).
        decoder_dropout: dropout inside the decoder while training (Segmenter: 0.1).
        backbone: the timm model name the encoder was derived from, if any (informational).
        attn_scale: attention logit scale; ``None`` means 1/sqrt(embed_dim // num_heads). Pruning
            keeps the unpruned model's scale (NViT) when it narrows the query/key width.
        blocks: per-block widths; ``None`` means every block has the default widths.
    """

    num_classes: int
    img_size: int | list[int] = 512
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    decoder_dim: int | None = None
    decoder_heads: int | None = None
    decoder_layers: int = 2
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1
    backbone: str | None = None
    attn_scale: float | None = None
    blocks: list[BlockDims] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.decoder_dim is None:
            self.decoder_dim = self.embed_dim
        if self.decoder_heads is None:
            self.decoder_heads = max(1, self.decoder_dim // 64)
        if self.blocks is not None:
            self.blocks = [b if isinstance(b, BlockDims) else BlockDims(**b) for b in self.blocks]
            if len(self.blocks) != self.depth:
                raise ValueError(f"spec has depth {self.depth} but {len(self.blocks)} block entries")
        if isinstance(self.img_size, (list, tuple)):
            self.img_size = [int(s) for s in self.img_size]
        if self.blocks is None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def crop(self) -> tuple[int, int]:
        """(H, W) of the crop the model runs on."""
        if isinstance(self.img_size, list):
            return self.img_size[0], self.img_size[1]
        return self.img_size, self.img_size

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of one crop."""
        h, w = self.crop
        return h // self.patch_size, w // self.patch_size

    def block_dims(self, i: int) -> BlockDims:
        """Widths of encoder block ``i`` (the defaults when the model is not pruned)."""
        if self.blocks is not None:
            return self.blocks[i]
        head = self.embed_dim // self.num_heads
        return BlockDims(self.num_heads, head, head, int(self.embed_dim * self.mlp_ratio))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmenterSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown key(s) in model spec: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from segcompress.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SegmenterSpec":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: model spec not found (written next to the .safetensors weights)") from None
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a valid Segmenter spec: {e}") from None


def spec_from_timm(name: str, num_classes: int, img_size: int | list[int], **overrides: Any) -> SegmenterSpec:
    """Spec of a Segmenter whose encoder has the architecture of the timm ViT ``name``.

    The timm model is built on the meta device only to read its widths (patch size, widths and
    the LayerNorm epsilon come from timm's registry). The plain class-token ViTs work (every
    ``vit_*_patch*`` of the ViT and DeiT papers); variants with parts the project's ViT does not
    have (LayerScale, register tokens, position embeddings without the class token, a pre-norm,
    average pooling) are refused by name.
    """
    import timm
    import torch

    with torch.device("meta"):
        vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    blk = vit.blocks[0]
    unsupported = [
        what for what, present in (
            ("LayerScale", not isinstance(blk.ls1, torch.nn.Identity)),
            ("register tokens", getattr(vit, "reg_token", None) is not None),
            ("no class token", getattr(vit, "cls_token", None) is None),
            ("position embeddings without the class token", getattr(vit, "no_embed_class", False)),
            ("a pre-norm", not isinstance(getattr(vit, "norm_pre", torch.nn.Identity()), torch.nn.Identity)),
            ("a distillation token", getattr(vit, "dist_token", None) is not None),
            ("pooled features (fc_norm)", not isinstance(getattr(vit, "fc_norm", torch.nn.Identity()), torch.nn.Identity)),
        ) if present
    ]
    if unsupported:
        raise ValueError(f"timm model {name!r} has {', '.join(unsupported)}, which the Segmenter encoder "
                         "(segcompress.models.vit) does not; use a plain class-token ViT such as vit_small_patch16_384")
    return SegmenterSpec(
        num_classes=num_classes,
        img_size=img_size,
        patch_size=vit.patch_embed.patch_size[0],
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / vit.embed_dim,
        backbone=name,
        **{"norm_eps": float(vit.norm.eps), **overrides},  # an override (e.g. a converted checkpoint's) wins
    )


ARCH_KEYS = {
    "timm_name", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pretrained", "drop_path_rate",
    "decoder_dropout",
}


def spec_from_arch(arch: dict[str, Any], num_classes: int, crop: int | list[int]) -> tuple[SegmenterSpec, str | None]:
    """Spec and pretrained source from a config ``backbones.<name>`` entry.

    ``arch`` either names a timm ViT (``timm_name``; its widths come from timm) or gives the widths
    (``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``) of a custom ViT.
    ``pretrained`` is ``None``, ``"timm"`` or a local checkpoint path (timm names only).

    Returns:
        (spec, pretrained)
    """
    unknown = sorted(set(arch) - ARCH_KEYS)
    if unknown:
        raise ValueError(f"unknown backbone key(s): {', '.join(unknown)} (allowed: {', '.join(sorted(ARCH_KEYS))})")
    extra = {key: arch[key] for key in ("drop_path_rate", "decoder_dropout") if key in arch}
    if arch.get("timm_name"):
        spec = spec_from_timm(arch["timm_name"], num_classes, crop, **extra)
    else:
        missing = [k for k in ("patch_size", "embed_dim", "depth", "num_heads") if k not in arch]
        if missing:
            raise ValueError(f"backbone needs timm_name or the widths; missing: {', '.join(missing)}")
        spec = SegmenterSpec(
            num_classes=num_classes, img_size=crop, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
            depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch.get("mlp_ratio", 4.0), **extra,
        )
    pretrained = arch.get("pretrained")
    if pretrained is not None and not arch.get("timm_name"):
        raise ValueError("backbone 'pretrained' needs 'timm_name' (the architecture the weights belong to)")
    return spec, pretrained
