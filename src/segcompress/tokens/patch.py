"""Thin application of the token methods to a Segmenter.

A :class:`TokenMethod` is a module that a :class:`~segcompress.models.segmenter.Segmenter`
consults when its ``token_method`` attribute is set (``Segmenter.forward`` and
``forward_features`` hand over to it). It runs the encoder on a
:class:`~segcompress.tokens.state.TokenState`: ``start`` embeds (CTS shares superpatches here),
``merge`` is called inside the blocks it names, between the attention residual and the MLP, and the
decoder either sees the tokens restored onto the grid (a gather through the map) or, with
``decoder_on_merged``, the reduced tokens, whose mask logits are then gathered back onto the grid.

Proportional attention adds log(size) to the attention logits of every block after a merge (and
of the decoder when it runs on merged tokens); padding tokens always get −∞.

A method's own weights live in their own file (its *policy*: the CTS policy net, DToP's heads,
``segcompress policy``), never in the Segmenter's checkpoint. A frozen policy (CTS) is not a
registered parameter; a policy trained with the model (DToP's heads) is, and adds its own terms to
the training loss (:meth:`TokenMethod.training_loss`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from segcompress.tokens.state import TokenState, restore_grid, split_images, stack_images, tokenwise

#: Devices on which a ragged batch's blocks (:func:`per_image_blocks`; merging blocks too, for a
#: method that :attr:`~TokenMethod.merges_each_image`) and the decoder on merged tokens
#: (:func:`decode_merged`) run image by image; elsewhere the padded batch runs as one.
PER_IMAGE_DEVICES: tuple[str, ...] = ("cpu",)


class TokenMethod(nn.Module):
    """Base class: the dense encoder on a token state (no merge anywhere).

    Args:
        prop_attn: add log(size) to attention logits once tokens have different sizes.
        decoder_on_merged: run the decoder on the reduced tokens and gather its mask logits back
            onto the grid, instead of restoring the tokens onto the grid first.
    """

    name = "none"
    #: whether :meth:`merge` reduces each image on its own (never reading the other images of the
    #: batch); then on the devices of :data:`PER_IMAGE_DEVICES` a merging block runs image by image
    #: (:func:`split_images`), as the blocks of a ragged batch do.
    merges_each_image = False

    def __init__(self, prop_attn: bool = False, decoder_on_merged: bool = False) -> None:
        super().__init__()
        self.prop_attn = prop_attn
        self.decoder_on_merged = decoder_on_merged
        #: per-block real-token counts of the last forward, filled when ``record`` is true:
        #: a list of (tokens entering block i (B,), tokens after its merge (B,)).
        self.record = False
        self.trace: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- what a method overrides ------------------------------------------------------------
    def merge_blocks(self, depth: int) -> set[int]:
        """0-based indices of the blocks that call :meth:`merge`."""
        return set()

    def start(self, model: nn.Module, img: torch.Tensor) -> TokenState:
        """The state entering block 0 (default: the model's own embedding, dense)."""
        return TokenState.from_tokens(model.embed(img), model.grid_of(img), model.num_prefix_tokens)

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        """Reduce ``state`` inside block ``index``; ``keys`` are its attention keys (B, h, T, d)."""
        return state

    # -- the shared machinery ----------------------------------------------------------------
    def run_block(self, index: int, blk: nn.Module, state: TokenState, merge: bool) -> TokenState:
        """One pre-norm block (``models.vit.Block``) on the state, with the merge between attention
        and MLP.

        When images hold different counts (padding), the per-token layers (norms, projections,
        MLP) see only the real tokens (:func:`~segcompress.tokens.state.tokenwise`) and attention
        runs padded, with −∞ bias on the padding keys. On the devices of :data:`PER_IMAGE_DEVICES`
        a merging block of a method that :attr:`merges_each_image` instead runs each image on its
        own tokens (merged as a batch of one, then padded again,
        :func:`~segcompress.tokens.state.stack_images`): ALGM's global merge at half of ViT-S/16's
        FLOPs took 0.22 s instead of 0.25 s per batch of 8 (512², one CPU thread). Blocks without a
        merge do so in :meth:`run_blocks`.
        """
        if merge and self.merges_each_image and runs_per_image(state):
            return stack_images([self.run_block(index, blk, one, True) for one in split_images(state)])
        attn = blk.attn
        x, rows = state.x, state.real_rows()
        q, k, v = attn.split_heads(tokenwise(lambda t: attn.qkv(blk.norm1(t)), x, rows))
        mixed = attn.mix(q, k, v, state.attn_bias(self.prop_attn))
        x = x + blk.drop_path1(blk.ls1(tokenwise(attn.project, mixed, rows)))
        state = state.with_x(x)
        if merge:
            state = self.merge(index, state, k)
            rows = state.real_rows()
        x = state.x
        x = x + blk.drop_path2(blk.ls2(tokenwise(lambda t: blk.mlp(blk.norm2(t)), x, rows)))
        return state.with_x(x)

    def encode(self, model: nn.Module, img: torch.Tensor, num_blocks: int | None = None,
               final_norm: bool = True) -> TokenState:
        """Encoder output state (after the final norm unless ``final_norm=False``), or the state
        after the first ``num_blocks`` blocks."""
        state = self.start(model, img)
        blocks = model.encoder.blocks
        end = len(blocks) if num_blocks is None else min(num_blocks, len(blocks))
        self.trace = []
        state = self.run_blocks(blocks, 0, end, state, self.merge_blocks(len(blocks)))
        if num_blocks is not None and num_blocks < len(blocks):
            return state
        return state.with_x(model.encoder.norm(state.x)) if final_norm else state

    def run_blocks(self, blocks: nn.ModuleList, start: int, stop: int, state: TokenState,
                   merging: set[int]) -> TokenState:
        """Blocks ``start`` to ``stop - 1`` on the state (:meth:`run_block`; ``merging``: the
        indices that merge), recording each block's counts in :attr:`trace` when ``record`` is set.

        A ragged stretch without a merge on the devices of :data:`PER_IMAGE_DEVICES` takes each image
        through all of its blocks at once (:func:`per_image_blocks`): the same tokens as block by
        block, without padding the batch again after every block.
        """
        i = start
        while i < stop:
            before = state.token_counts() if self.record else None
            if i not in merging and runs_per_image(state):
                j = min([k for k in merging if k > i] + [stop])
                state = state.with_x(per_image_blocks(blocks[i:j], state, self.prop_attn))
            else:
                j = i + 1
                state = self.run_block(i, blocks[i], state, i in merging)
            if self.record:
                self.trace.extend([(before, state.token_counts())] * (j - i))
            i = j
        return state

    def features(self, model: nn.Module, img: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Final encoder patch features restored onto the grid, (B, N, E) (class token dropped)."""
        return self.encode(model, img, final_norm=final_norm).unmerge()

    def masks(self, model: nn.Module, img: torch.Tensor) -> torch.Tensor:
        """Mask logits on the patch grid (B, K, gh, gw)."""
        state = self.encode(model, img)
        if self.decoder_on_merged and state.merged:
            return restore_grid(state, decode_merged(model.decoder, state, self.prop_attn))
        return model.decode(state.unmerge(), state.grid)

    def forward(self, model: nn.Module, img: torch.Tensor) -> torch.Tensor:
        return self.masks(model, img)

    def training_loss(self, labels: torch.Tensor, loss_stride: int = 1,
                      offset: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
        """The method's own loss terms for the last forward (added to the segmentation loss while
        the model trains with the method attached); ``None``: it has none."""
        return None

    def knob(self) -> dict[str, Any]:
        """The knob dict that rebuilds this method (for results rows)."""
        return {"prop_attn": self.prop_attn, "decoder_on_merged": self.decoder_on_merged}


def runs_per_image(state: TokenState) -> bool:
    """Whether ``state`` is a ragged batch (images with different token counts) on a device of
    :data:`PER_IMAGE_DEVICES`, where it runs image by image (:func:`per_image`)."""
    return state.counts is not None and state.x.device.type in PER_IMAGE_DEVICES


def per_image(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], state: TokenState,
              prop_attn: bool, start: int = 0) -> torch.Tensor:
    """``fn(tokens, bias)`` on each image of a ragged batch alone, (B, T, C').

    Image b's tokens are its real ones from ``start`` on, ``state.x[b:b+1, start:n_b]``; the bias
    is their log sizes under ``prop_attn`` (else ``None``). Rows outside them (before ``start``,
    padding) are zeros. ``fn`` maps (1, n, C) to (1, n, C'). In training each image draws its own
    dropout and drop-path samples.
    """
    bias = state.attn_bias(True) if prop_attn else None
    B, T, _ = state.x.shape
    out: torch.Tensor | None = None
    for b, n in enumerate(state.token_counts().tolist()):
        y = fn(state.x[b:b + 1, start:n], None if bias is None else bias[b:b + 1, ..., start:n])[0]
        if out is None:
            out = y.new_zeros(B, T, y.shape[-1])
        out[b, start:n] = y
    assert out is not None
    return out


def per_image_blocks(blocks: Sequence[nn.Module], state: TokenState, prop_attn: bool) -> torch.Tensor:
    """The tokens after ``blocks`` (consecutive ``models.vit.Block`` without a merge), (B, T, C):
    each image of a ragged batch runs alone on its real tokens through all of them
    (:func:`per_image`); padding rows are zeros.

    A padded batch spends the largest image's T² in attention on every image, and packing the real
    tokens for the per-token layers and scattering them back costs two copies per layer. Measured
    on CPU at one thread, with ALGM at half of ViT-S/16's FLOPs (512², a batch of 8 scenes holding
    374 to 588 tokens): padding was 40 % more attention work than the images' own, and the forward
    pass ran 9 to 12 % faster image by image, with the same logits to float32 rounding. Taking each
    image through the whole stretch (blocks 6-12 there) instead of re-padding the batch after every
    block gives the same tokens bit for bit, 3 % faster over those blocks. On CUDA the padded batch
    stays (one kernel per layer; a kernel per image would trade the padding for launches,
    unmeasured).
    """
    def run(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        for blk in blocks:
            x = blk(x, attn_mask=bias)
        return x

    return per_image(run, state, prop_attn)


def decode_merged(decoder: nn.Module, state: TokenState, prop_attn: bool) -> torch.Tensor:
    """Mask logits per token, (B, T, K), from the decoder run on the state's patch tokens. The
    prefix rows are zeros; padding rows are zeros on the per-image path and the decoder's output
    for the padding queries otherwise. The patch → token map never points at either.

    A ragged batch on the devices of :data:`PER_IMAGE_DEVICES` goes through the decoder image by
    image (:func:`per_image`); elsewhere the padded batch runs at once with −∞ bias on the padding
    keys. Measured on CPU at one thread, ALGM at half and at 35 % of ViT-S/16's FLOPs (512², batch
    8): 8 and 4 % less time per forward pass, logits equal to 2e-5.
    """
    p = state.num_prefix
    if runs_per_image(state):
        return per_image(decoder, state, prop_attn, start=p)
    bias = state.attn_bias(prop_attn)
    per_token = decoder(state.x[:, p:], None if bias is None else bias[..., p:])  # (B, T-p, K)
    return torch.cat([per_token.new_zeros(per_token.shape[0], p, per_token.shape[-1]), per_token], 1)


def attach(model: nn.Module, method: TokenMethod | None) -> nn.Module:
    """Set (or with ``None`` remove) the model's token method; returns the model."""
    model.token_method = method
    return model


def restored_features(model: nn.Module, img: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
    """Final encoder features on the original patch grid (B, N, E), whatever token method is attached.

    Every patch position carries the feature of the token that holds it (the effective-rank
    input); ``final_norm=False`` takes them before the encoder's last LayerNorm. Without a token
    method these are the dense model's features.
    """
    method = getattr(model, "token_method", None) or TokenMethod()
    return method.features(model, img, final_norm=final_norm)


def restored_state(model: nn.Module, img: torch.Tensor, final_norm: bool = True) -> TokenState:
    """The final encoder :class:`TokenState` (features, sizes and the patch → token map)."""
    method = getattr(model, "token_method", None) or TokenMethod()
    return method.encode(model, img, final_norm=final_norm)
