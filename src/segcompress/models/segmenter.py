"""Segmenter (Strudel et al., ICCV 2021): a ViT encoder and a mask-transformer decoder.

The encoder is :class:`segcompress.models.vit.VisionTransformer`, timm's ViT with timm's parameter
names (so timm weights and variants load), whose :class:`Attention` allows per-block query/key and
value widths (needed by structural pruning) and an additive attention bias (needed by proportional
attention).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from segcompress.models.spec import SegmenterSpec
from segcompress.models.vit import Attention, Block, VisionTransformer

__all__ = ["Attention", "MaskTransformer", "Segmenter", "build_encoder", "build_segmenter", "grid_view", "unfused_attention"]


class MaskTransformer(nn.Module):
    """Segmenter's mask-transformer decoder.

    Patch tokens are projected to the decoder width, K learned class embeddings are appended, both
    pass through ``depth`` transformer blocks, and the masks are the scalar products of the
    L2-normalised patch and class embeddings, followed by a LayerNorm over classes.
    """

    def __init__(
            self,
            num_classes: int,
            encoder_dim: int,
            dim: int,
            depth: int = 2,
            num_heads: int = 1,
            mlp_ratio: float = 4.0,
            dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        head = dim // num_heads
        self.blocks = nn.ModuleList([
            Block(dim, Attention(dim, num_heads, head, head, attn_drop=dropout, proj_drop=dropout),
                  int(dim * mlp_ratio), nn.LayerNorm, proj_drop=dropout)
            for _ in range(depth)
        ])
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token mask logits.

        Args:
            x: patch tokens (B, N, E) (class token dropped), on the grid or merged.
            attn_bias: optional additive attention bias over the N patch tokens (B, 1, 1, N),
                e.g. log token sizes for proportional attention; class embeddings get 0.

        Returns:
            (B, N, K) mask logits, one row per input token.
        """
        B, N, _ = x.shape
        K = self.num_classes
        x = torch.cat((self.proj_dec(x), self.cls_emb.expand(B, -1, -1)), dim=1)
        if attn_bias is not None:
            attn_bias = F.pad(attn_bias, (0, K))
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_bias)
        x = self.decoder_norm(x)
        patches = F.normalize(x[:, :N] @ self.proj_patch, dim=-1)
        classes = F.normalize(x[:, N:] @ self.proj_classes, dim=-1)
        return self.mask_norm(patches @ classes.transpose(1, 2))


class Segmenter(nn.Module):
    """ViT encoder + mask-transformer decoder + bilinear upsampling to the input size.

    ``forward`` takes normalised crops of the spec's crop size and returns per-pixel logits.
    The stages are separate methods (``embed``, ``encode``, ``decode``) so a token method can act
    between or inside the encoder blocks: when ``token_method`` is set (a
    :class:`segcompress.tokens.patch.TokenMethod`, see ``segcompress.methods.apply_method``),
    ``forward`` and ``forward_features`` hand the encoder and decoder over to it.
    """

    def __init__(self, spec: SegmenterSpec, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder if encoder is not None else build_encoder(spec)
        self.decoder = MaskTransformer(
            spec.num_classes, spec.embed_dim, spec.decoder_dim, spec.decoder_layers, spec.decoder_heads,
            dropout=spec.decoder_dropout,
        )
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        self.token_method: nn.Module | None = None

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``img`` (B, 3, H, W) and add the class token and position embeddings."""
        enc = self.encoder
        return enc.norm_pre(enc.patch_drop(enc._pos_embed(enc.patch_embed(img))))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the encoder blocks and the final norm on embedded tokens."""
        for blk in self.encoder.blocks:
            x = blk(x)
        return self.encoder.norm(x)

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Mask logits on the patch grid (B, K, gh, gw), a channels-last view (:func:`grid_view`),
        from encoder patch tokens on the grid."""
        return grid_view(self.decoder(tokens), grid)

    def grid_of(self, img: torch.Tensor) -> tuple[int, int]:
        p = self.spec.patch_size
        return img.shape[-2] // p, img.shape[-1] // p

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Final encoder patch features on the original grid (B, gh*gw, E), class token dropped."""
        if self.token_method is not None:
            return self.token_method.features(self, img)
        return self.encode(self.embed(img))[:, self.num_prefix_tokens:]

    def forward_masks(self, img: torch.Tensor) -> torch.Tensor:
        """Mask logits on the patch grid (B, K, gh, gw), channels-last, before the upsampling."""
        if self.token_method is not None:
            return self.token_method(self, img)
        return self.decode(self.forward_features(img), self.grid_of(img))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (B, K, H, W), channels-last in memory, for normalised crops (B, 3, H, W):
        :meth:`forward_masks` upsampled bilinearly to the crop."""
        return F.interpolate(self.forward_masks(img), size=img.shape[-2:], mode="bilinear", align_corners=False)


def grid_view(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major per-patch values (B, gh·gw, C) as a (B, C, gh, gw) view, channels-last in memory.

    The batch stride stays canonical at every batch size (a transpose-then-reshape gives batch 1
    an odd one, which sends CPU upsampling down a path 4x slower than NCHW). On CPU, bilinear
    upsampling of this layout is 4-5x faster than of NCHW, forward and backward, and its output
    feeds the class-last losses (``train.pixel_loss_sums``) and sliding-window sums without a copy.
    """
    return values.reshape(values.shape[0], *grid, values.shape[-1]).permute(0, 3, 1, 2)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_encoder(spec: SegmenterSpec, pretrained: str | None = None) -> VisionTransformer:
    """The spec's ViT encoder, each block with its own :class:`Attention` and MLP widths.

    Args:
        spec: the architecture.
        pretrained: ``None`` (random init, timm's scheme), ``"timm"`` (download ``spec.backbone``'s
            weights, needs the network or a warm Hugging Face cache) or the path of a local timm
            checkpoint file for ``spec.backbone``. timm loads them (resizing the position
            embeddings to the crop grid) and they are copied in under the same names.
    """
    from functools import partial

    norm_layer = partial(nn.LayerNorm, eps=spec.norm_eps)
    rates = torch.linspace(0, spec.drop_path_rate, spec.depth, device="cpu").tolist()  # timm's per-block rule
    blocks = []
    for i, rate in enumerate(rates):
        dims = spec.block_dims(i)
        attn = Attention(spec.embed_dim, dims.num_heads, dims.qk_dim, dims.v_dim, scale=spec_scale(spec))
        blocks.append(Block(spec.embed_dim, attn, dims.mlp_hidden, norm_layer, drop_path=rate))
    vit = VisionTransformer(spec.crop, spec.patch_size, spec.embed_dim, blocks, norm_layer)
    for blk in vit.blocks:
        blk.apply(_init_weights)
    if pretrained is not None:
        vit.load_state_dict(_timm_weights(spec, pretrained))
    return vit


def _timm_weights(spec: SegmenterSpec, pretrained: str) -> dict[str, torch.Tensor]:
    """The encoder weights of ``spec.backbone`` loaded by timm (``"timm"`` or a local file)."""
    import timm

    if spec.backbone is None:
        raise ValueError("pretrained weights need spec.backbone (a timm model name)")
    overlay = None if pretrained == "timm" else {"file": str(Path(pretrained))}
    if overlay is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"{pretrained}: pretrained backbone file not found")
    ref = timm.create_model(
        spec.backbone, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, img_size=spec.img_size,
    )
    if ref.embed_dim != spec.embed_dim or len(ref.blocks) != spec.depth:
        raise ValueError(f"timm model {spec.backbone} does not match the spec's widths")
    return ref.state_dict()


def spec_scale(spec: SegmenterSpec) -> float:
    """Attention scale: ``spec.attn_scale``, else 1/sqrt(embed_dim // num_heads)."""
    return spec.attn_scale if spec.attn_scale is not None else (spec.embed_dim // spec.num_heads) ** -0.5


def build_segmenter(spec: SegmenterSpec, pretrained: str | None = None) -> Segmenter:
    """A Segmenter for ``spec``; see :func:`build_encoder` for ``pretrained``."""
    return Segmenter(spec, build_encoder(spec, pretrained))


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run every attention module with explicit matmuls (so FLOPs counters see them)."""
    modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    saved = [m.fused_attn for m in modules]
    for m in modules:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m, s in zip(modules, saved):
            m.fused_attn = s
