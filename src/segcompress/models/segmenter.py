"""Segmenter (Strudel et al., ICCV 2021): a timm ViT encoder and a mask-transformer decoder.

The encoder is a timm ``VisionTransformer`` (so timm weights and variants load) whose attention
modules are replaced by :class:`Attention`, which has the same parameter names and layout as
timm's but allows per-block query/key and value widths (needed by structural pruning) and an
additive attention bias (needed by proportional attention). With the default widths the two are
numerically the same module.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from segcompress.models.spec import SegmenterSpec


class Attention(nn.Module):
    """Multi-head self-attention with per-head query/key width ``qk_dim`` and value width ``v_dim``.

    ``qkv`` is one linear layer whose output is laid out ``[q (h*qk) | k (h*qk) | v (h*v)]``: with
    ``qk_dim == v_dim`` exactly timm's layout, so timm checkpoints load unchanged.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = scale if scale is not None else qk_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x`` (B, N, C) to q, k of shape (B, h, N, qk_dim) and v of shape (B, h, N, v_dim)."""
        return self.split_heads(self.qkv(x))

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``qkv`` projection's output (B, N, h·(2·qk_dim + v_dim)) as per-head q, k, v."""
        B, N, _ = qkv.shape
        h, dq = self.num_heads, self.qk_dim
        q, k, v = qkv.split([h * dq, h * dq, h * self.v_dim], dim=-1)
        return (
            q.view(B, N, h, dq).transpose(1, 2),
            k.view(B, N, h, dq).transpose(1, 2),
            v.view(B, N, h, self.v_dim).transpose(1, 2),
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ · scale + bias) v, merged over heads and projected: (B, N, C)."""
        return self.project(self.mix(q, k, v, bias))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The output projection of the heads' concatenated values (..., h·v_dim) -> (..., C)."""
        return self.proj_drop(self.proj(x))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """softmax(q kᵀ · scale + bias) v with the heads concatenated, (B, N, h·v_dim), unprojected."""
        B, _, N, _ = q.shape
        if self.fused_attn:
            # SDPA's fast kernels need one head width for q, k and v: zero-pad the narrower side
            # (exact: zero q/k columns add nothing to q kᵀ, zero v columns are sliced off).
            width = max(self.qk_dim, self.v_dim)
            if self.qk_dim < width:
                q, k = F.pad(q, (0, width - self.qk_dim)), F.pad(k, (0, width - self.qk_dim))
            x = F.scaled_dot_product_attention(
                q, k, F.pad(v, (0, width - self.v_dim)) if self.v_dim < width else v, attn_mask=bias,
                dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale,
            )[..., :self.v_dim]
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        return x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Args:
            x: tokens (B, N, C).
            attn_mask: additive bias broadcastable to (B, h, N, N), e.g. log token sizes.
        """
        if is_causal:
            raise ValueError("Segmenter attention is never causal")
        q, k, v = self.qkv_heads(x)
        return self.attend(q, k, v, attn_mask)


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
        from timm.models.vision_transformer import Block

        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.blocks = nn.ModuleList([
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout, norm_layer=nn.LayerNorm)
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


def build_encoder(spec: SegmenterSpec, pretrained: str | None = None) -> nn.Module:
    """A timm ``VisionTransformer`` with the spec's widths and :class:`Attention` in every block.

    Args:
        spec: the architecture.
        pretrained: ``None`` (random init), ``"timm"`` (download ``spec.backbone``'s weights, needs
            the network or a warm Hugging Face cache) or the path of a local timm checkpoint file
            for ``spec.backbone``. Position embeddings are resized to the crop grid by timm.
    """
    import timm
    from functools import partial
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    if pretrained is not None:
        if spec.backbone is None:
            raise ValueError("pretrained weights need spec.backbone (a timm model name)")
        overlay = None if pretrained == "timm" else {"file": str(Path(pretrained))}
        if overlay is not None and not Path(pretrained).is_file():
            raise FileNotFoundError(f"{pretrained}: pretrained backbone file not found")
        vit = timm.create_model(
            spec.backbone, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0,
            img_size=spec.img_size, drop_path_rate=spec.drop_path_rate,
        )
        if vit.embed_dim != spec.embed_dim or len(vit.blocks) != spec.depth:
            raise ValueError(f"timm model {spec.backbone} does not match the spec's widths")
    else:
        vit = VisionTransformer(
            img_size=spec.img_size, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
            num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, qkv_bias=True, num_classes=0,
            drop_path_rate=spec.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=spec.norm_eps),
        )
    for i, blk in enumerate(vit.blocks):
        dims = spec.block_dims(i)
        old_attn, old_mlp = blk.attn, blk.mlp
        blk.attn = Attention(spec.embed_dim, dims.num_heads, dims.qk_dim, dims.v_dim, scale=spec_scale(spec))
        blk.mlp = Mlp(spec.embed_dim, dims.mlp_hidden)
        if pretrained is None:
            blk.attn.apply(_init_weights)
            blk.mlp.apply(_init_weights)
        else:  # same parameter names and shapes as timm's
            blk.attn.load_state_dict(old_attn.state_dict())
            blk.mlp.load_state_dict(old_mlp.state_dict())
    return vit


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
