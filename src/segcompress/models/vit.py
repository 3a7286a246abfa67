"""The plain ViT the Segmenter is built on, with timm's module tree and parameter names.

timm's ``VisionTransformer`` is the reference: every parameter here has the name and shape timm
gives it (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm``), so timm checkpoints load unchanged and the forward pass is
the same computation (tests/test_models.py compares the two to float precision). It lives here
rather than being imported from timm because ``import timm`` pulls in torchvision and
``torch._dynamo`` (about 4 s per process on this project's CPU machines, paid by every pipeline
job); timm is imported only where it is really needed: pretrained weights by name, a timm
architecture's widths, and the CTS policy network.

:class:`Attention` differs from timm's in two ways structural pruning and proportional attention
need: per-block query/key and value widths, and an additive attention bias. With the default
widths it is numerically timm's module.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Args:
            x: tokens (B, N, C).
            attn_mask: additive bias broadcastable to (B, h, N, N), e.g. log token sizes.
        """
        q, k, v = self.qkv_heads(x)
        return self.attend(q, k, v, attn_mask)


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1, GELU, dropout, fc2, dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``, kept paths scaled by 1/keep)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """timm's pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``ls1``/``ls2`` (timm's LayerScale, off in ViT) and ``drop_path1``/``drop_path2`` keep timm's
    attribute names, so code written against timm's block (the token methods) runs on it.
    """

    def __init__(
            self,
            dim: int,
            attn: Attention,
            mlp_hidden: int,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
            proj_drop: float = 0.0,
            drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn
        self.ls1 = nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_hidden, proj_drop)
        self.ls2 = nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by one strided convolution, returned as tokens (B, N, E)."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()  # timm's patch norm, off in ViT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's crop {self.img_size}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class VisionTransformer(nn.Module):
    """A class-token ViT encoder without a classifier head (timm's ``VisionTransformer`` with
    ``num_classes=0``, learned position embeddings that include the class token).

    Args:
        img_size: input crop (H, W).
        patch_size: patch side.
        embed_dim: width E.
        blocks: the transformer blocks (their attention widths may differ per block).
        norm_layer: the final norm's constructor.
    """

    num_prefix_tokens = 1
    no_embed_class = False

    def __init__(
            self,
            img_size: tuple[int, int],
            patch_size: int,
            embed_dim: int,
            blocks: list[Block],
            norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Identity()
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm_layer(embed_dim)
        # timm's default ("") initialisation; the blocks initialise their own linear layers.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, E), class token first."""
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(img))))
        return self.norm(self.blocks(x))
