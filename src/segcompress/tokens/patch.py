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

A method's own weights (the CTS policy net) live in their own file: they are not registered
parameters of the Segmenter, so they never enter its checkpoint or an optimiser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segcompress.tokens import algm as algm_fn
from segcompress.tokens import cts as cts_fn
from segcompress.tokens import tome as tome_fn
from segcompress.tokens.state import TokenState, restore_grid, tokenwise


class TokenMethod(nn.Module):
    """Base class: the dense encoder on a token state (no merge anywhere).

    Args:
        prop_attn: add log(size) to attention logits once tokens have different sizes.
        decoder_on_merged: run the decoder on the reduced tokens and gather its mask logits back
            onto the grid, instead of restoring the tokens onto the grid first.
    """

    name = "none"

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
        """One pre-norm timm block on the state, with the merge between attention and MLP.

        The per-token layers (norms, projections, MLP) see only the real tokens when images hold
        different counts (:func:`~segcompress.tokens.state.tokenwise`); attention runs padded,
        with −∞ bias on the padding keys.
        """
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
        merging = self.merge_blocks(len(blocks))
        self.trace = []
        for i, blk in enumerate(blocks):
            if num_blocks is not None and i >= num_blocks:
                return state
            before = state.token_counts() if self.record else None
            state = self.run_block(i, blk, state, i in merging)
            if self.record:
                self.trace.append((before, state.token_counts()))
        return state.with_x(model.encoder.norm(state.x)) if final_norm else state

    def features(self, model: nn.Module, img: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Final encoder patch features restored onto the grid, (B, N, E) (class token dropped)."""
        return self.encode(model, img, final_norm=final_norm).unmerge()

    def masks(self, model: nn.Module, img: torch.Tensor) -> torch.Tensor:
        """Mask logits on the patch grid (B, K, gh, gw)."""
        state = self.encode(model, img)
        p = state.num_prefix
        if self.decoder_on_merged and state.merged:
            bias = state.attn_bias(self.prop_attn)
            per_token = model.decoder(state.x[:, p:], None if bias is None else bias[..., p:])  # (B, T-p, K)
            per_token = torch.cat([per_token.new_zeros(per_token.shape[0], p, per_token.shape[-1]), per_token], 1)
            return restore_grid(state, per_token)
        return model.decode(state.unmerge(), state.grid)

    def forward(self, model: nn.Module, img: torch.Tensor) -> torch.Tensor:
        return self.masks(model, img)

    def knob(self) -> dict[str, Any]:
        """The knob dict that rebuilds this method (for results rows)."""
        return {"prop_attn": self.prop_attn, "decoder_on_merged": self.decoder_on_merged}


class ToMe(TokenMethod):
    """ToMe in every block with r > 0 (metric: attention keys averaged over heads).

    Args:
        r: per-layer schedule, see :func:`~segcompress.tokens.tome.parse_r`.
        depth: encoder depth.
        prop_attn: proportional attention (reference default: on).
        decoder_on_merged: decoder on merged tokens (default: off, tokens restored onto the grid).
    """

    name = "tome"

    def __init__(self, r: tome_fn.RSchedule, depth: int, prop_attn: bool = True, decoder_on_merged: bool = False):
        super().__init__(prop_attn, decoder_on_merged)
        self.r_spec = r
        self.r = tome_fn.parse_r(depth, r)

    def merge_blocks(self, depth: int) -> set[int]:
        return {i for i, r in enumerate(self.r) if r > 0}

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        return tome_fn.bipartite_soft_matching(state, tome_fn.head_mean_keys(keys), self.r[index])

    def knob(self) -> dict[str, Any]:
        r: Any = self.r_spec
        out: dict[str, Any] = {}
        if isinstance(r, tuple):
            r, out["inflect"] = r
        return {"r": r, **out, **super().knob()}


class ALGM(TokenMethod):
    """ALGM: local merging (CLAP) in the first selected block, global (GBM) in the second.

    Args:
        config: thresholds, layers, window, batch coupling.
        prop_attn: proportional attention (reference: effectively off).
        decoder_on_merged: decoder on merged tokens (reference: on).
    """

    name = "algm"

    def __init__(self, config: algm_fn.ALGMConfig, prop_attn: bool = False, decoder_on_merged: bool = True):
        super().__init__(prop_attn, decoder_on_merged)
        self.config = config

    def merge_blocks(self, depth: int) -> set[int]:
        first, second = self.config.layers
        if second > depth:
            raise ValueError(f"ALGM layers {self.config.layers} exceed the encoder's {depth} blocks")
        return {first - 1, second - 1}

    def merge(self, index: int, state: TokenState, keys: torch.Tensor) -> TokenState:
        c = self.config
        if index == c.layers[0] - 1:
            return algm_fn.local_merge(state, state.x, c.threshold, c.window, c.batch_coupled)
        return algm_fn.global_merge(state, state.x, c.layers[1], c.batch_coupled, c.global_scale)

    def knob(self) -> dict[str, Any]:
        c = self.config
        return {
            "threshold": c.threshold, "layers": list(c.layers), "window": list(c.window),
            "batch_coupled": c.batch_coupled, "global_scale": c.global_scale, **super().knob(),
        }


class CTS(TokenMethod):
    """CTS: the policy net picks the K superpatches per image that share one token.

    Args:
        k: shared superpatches per image.
        policy: the policy net (frozen).
        policy_path: where it came from (for the knob).
        prop_attn: proportional attention (reference: off).
        decoder_on_merged: decoder on the shared tokens (reference: on).
    """

    name = "cts"

    def __init__(self, k: int, policy: nn.Module, policy_path: str | None = None, prop_attn: bool = False,
                 decoder_on_merged: bool = True):
        super().__init__(prop_attn, decoder_on_merged)
        if k < 0:
            raise ValueError(f"CTS k must be >= 0, got {k}")
        self.k = int(k)
        # Not a registered submodule: the frozen policy stays out of the Segmenter's parameters and
        # state dict (it has its own file) and stays in eval mode; _apply moves it with the model.
        object.__setattr__(self, "policy", policy.eval().requires_grad_(False))
        self.policy_path = policy_path

    def _apply(self, fn: Any, recurse: bool = True) -> "CTS":
        self.policy._apply(fn)
        return super()._apply(fn, recurse)

    def start(self, model: nn.Module, img: torch.Tensor) -> TokenState:
        if self.k == 0:
            return super().start(model, img)
        with torch.no_grad():
            scores = cts_fn.uniform_scores(self.policy, img, model.grid_of(img))
        return cts_fn.share_tokens(model.encoder, img, scores, self.k)

    def knob(self) -> dict[str, Any]:
        return {"k": self.k, "policy": self.policy_path, **super().knob()}


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


KNOB_KEYS: dict[str, set[str]] = {
    "tome": {"r", "inflect", "prop_attn", "decoder_on_merged"},
    "algm": {"threshold", "layers", "window", "batch_coupled", "global_scale", "dataset", "prop_attn",
             "decoder_on_merged"},
    "cts": {"k", "policy", "prop_attn", "decoder_on_merged"},
}


def method_from_knob(name: str, knob: dict[str, Any], model: nn.Module) -> TokenMethod:
    """Build token method ``name`` for ``model`` from its knob dict (see ``segcompress.methods``).

    * ``tome``: ``{"r": int | [per-layer ints], "inflect": float (with an int r: the reference's
      (r, inflect) ramp), "prop_attn": true, "decoder_on_merged": false}``
    * ``algm``: ``{"threshold": τ, "layers": [1, 5], "window": 2 | [h, w], "batch_coupled": false,
      "global_scale": 1.0, "dataset": "ade20k" (reference τ default), "prop_attn": false,
      "decoder_on_merged": true}``
    * ``cts``: ``{"k": int, "policy": "policy.safetensors" | null (untrained), "prop_attn": false,
      "decoder_on_merged": true}``
    """
    if name not in KNOB_KEYS:
        raise ValueError(f"unknown token method {name!r}; choose one of {', '.join(sorted(KNOB_KEYS))}")
    unknown = sorted(set(knob) - KNOB_KEYS[name])
    if unknown:
        raise ValueError(f"unknown {name} knob key(s): {', '.join(unknown)} (allowed: {', '.join(sorted(KNOB_KEYS[name]))})")
    spec = model.spec
    flags = {k: bool(knob[k]) for k in ("prop_attn", "decoder_on_merged") if k in knob}
    if name == "tome":
        if "r" not in knob:
            raise ValueError("tome knob needs 'r' (an int or a per-layer list)")
        r: Any = knob["r"]
        if "inflect" in knob:
            if not isinstance(r, int):
                raise ValueError("tome 'inflect' needs an int 'r'")
            r = (r, float(knob["inflect"]))
        elif not isinstance(r, (int, list)):
            raise ValueError(f"tome 'r' must be an int or a list of ints, got {r!r}")
        return ToMe(r, spec.depth, **flags)
    if name == "algm":
        return ALGM(algm_fn.config_from_knob(knob, spec.depth, spec.embed_dim), **flags)
    if "k" not in knob:
        raise ValueError("cts knob needs 'k' (shared superpatches per image)")
    device = next(model.parameters()).device
    path = knob.get("policy")
    policy = cts_fn.load_policy(path, map_location=device)
    return CTS(int(knob["k"]), policy, None if path is None else str(path), **flags)
