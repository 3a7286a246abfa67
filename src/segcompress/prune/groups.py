"""The prunable structures of a Segmenter encoder and the parameter slices each unit owns.

Five kinds of structure (NViT, docs/methods.md §5.1):

* ``emb``: the residual width E, one structure shared by every block. A unit is one channel of
  the patch embedding's output, the class token and position embedding, every LayerNorm of the
  encoder, the input of every ``qkv`` and ``fc1``, the output of every ``proj`` and ``fc2``, and the
  input of the decoder's ``proj_dec`` (the decoder keeps its own width D).
* ``heads`` (per block): a whole attention head: its Q, K and V rows of ``qkv`` and its columns of
  ``proj``.
* ``qk`` (per block): one query/key dimension, the same index in every head ("head alignment", so
  all heads keep the same width): a Q row and a K row of ``qkv`` per head.
* ``v`` (per block): one value dimension, aligned across heads: a V row of ``qkv`` per head and the
  matching ``proj`` columns.
* ``mlp`` (per block): one hidden channel: an ``fc1`` row (and bias), an ``fc2`` column.

Who finds the slices. The ``emb`` and ``mlp`` couplings are plain channel dependencies, so they
come from torch-pruning's dependency graph (DepGraph), traced once on the model: the E group
reaches through every residual add, LayerNorm, class-token concat and the decoder's projection
without a hand-written list, and stays right if the encoder changes (e.g. a pre-norm). The
attention structures are not channel dependencies DepGraph can express: the ``qkv`` rows are laid
out ``[q h*qk | k h*qk | v h*v]`` and a QK unit is a *strided* set of rows (one per head, the same
in every head), which is our own layout; their indices are computed here (:func:`qkv_rows`).
Physical removal then slices the state dict with these indices and loads it into a model built
from the smaller spec (:mod:`segcompress.prune.shrink`), so no module is edited in place.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from segcompress.models.segmenter import Segmenter, spec_scale
from segcompress.models.spec import BlockDims, SegmenterSpec
from segcompress.prune.config import KINDS


@dataclass(frozen=True)
class Key:
    """One prunable structure: ``kind`` and its block (``None`` for the global ``emb``)."""

    kind: str
    block: int | None = None

    def __str__(self) -> str:
        return self.kind if self.block is None else f"{self.kind}.{self.block}"


@dataclass(frozen=True)
class ParamSlice:
    """Dimension ``dim`` of parameter ``name`` is indexed by the units of a structure.

    Args:
        name: parameter name in ``model.named_parameters()``.
        dim: the dimension that runs over the units.
        source: whether the slice counts in the unit's saliency as NViT's ``compute_criteria_from``
            has it (for ``emb``: the patch embedding's output and the Linear layers of the encoder
            blocks; ``PruneConfig.emb_saliency: group`` counts every ``emb`` slice instead).
    """

    name: str
    dim: int
    source: bool = True


class Masks:
    """Which units of every structure are alive (bool vectors over the dense model's units).

    ``version`` increases on every change, so derived masks can be cached.
    """

    def __init__(self, sizes: dict[Key, int], device: torch.device | str = "cpu") -> None:
        self.alive: dict[Key, torch.Tensor] = {k: torch.ones(n, dtype=torch.bool, device=device) for k, n in sizes.items()}
        self._counts = dict(sizes)
        self._sizes = dict(sizes)
        self.version = 0

    def __getitem__(self, key: Key) -> torch.Tensor:
        return self.alive[key]

    def count(self, key: Key) -> int:
        """Alive units of ``key`` (kept on the host: no device sync)."""
        return self._counts[key]

    def remove(self, key: Key, units: torch.Tensor) -> None:
        """Mark ``units`` (indices into the dense structure) of ``key`` as pruned."""
        self.alive[key][units.to(self.alive[key].device)] = False
        self._counts[key] = int(self.alive[key].sum())
        self.version += 1

    def is_full(self, key: Key) -> bool:
        return self._counts[key] == self._sizes[key]

    def keep_index(self, key: Key) -> torch.Tensor:
        """Sorted indices of the alive units of ``key`` (on the CPU)."""
        return self.alive[key].nonzero().flatten().cpu()

    def to(self, device: torch.device | str) -> "Masks":
        self.alive = {k: v.to(device) for k, v in self.alive.items()}
        self.version += 1
        return self

    def state(self) -> dict[str, list[int]]:
        """The pruned units of every structure, for reports."""
        return {str(k): (~v).nonzero().flatten().tolist() for k, v in self.alive.items() if not v.all()}


class PruneSpace:
    """The prunable structures of one (dense) Segmenter and where their units live.

    Args:
        model: the dense Segmenter (any per-block widths; it is only traced, not changed).
    """

    def __init__(self, model: Segmenter) -> None:
        self.spec: SegmenterSpec = model.spec
        self.depth = self.spec.depth
        self.dims: list[BlockDims] = [self.spec.block_dims(i) for i in range(self.depth)]
        self.scale = spec_scale(self.spec)
        self.emb_slices, mlp_groups = _trace_channel_groups(model)
        self.mlp_slices: list[list[ParamSlice]] = mlp_groups
        self.sizes: dict[Key, int] = {Key("emb"): self.spec.embed_dim}
        for i, d in enumerate(self.dims):
            self.sizes[Key("heads", i)] = d.num_heads
            self.sizes[Key("qk", i)] = d.qk_dim
            self.sizes[Key("v", i)] = d.v_dim
            self.sizes[Key("mlp", i)] = d.mlp_hidden

    def keys(self, kinds: tuple[str, ...] = KINDS) -> Iterator[Key]:
        """Every structure of the given kinds, ``emb`` first, then block by block."""
        if "emb" in kinds:
            yield Key("emb")
        for i in range(self.depth):
            for kind in ("heads", "qk", "v", "mlp"):
                if kind in kinds:
                    yield Key(kind, i)

    def new_masks(self, device: torch.device | str = "cpu") -> Masks:
        return Masks(self.sizes, device)

    # ------------------------------------------------------------------ widths after pruning

    def widths(self, masks: Masks) -> tuple[int, list[BlockDims]]:
        """(E, per-block dims) of the model the masks describe."""
        blocks = [
            BlockDims(masks.count(Key("heads", i)), masks.count(Key("qk", i)), masks.count(Key("v", i)),
                      masks.count(Key("mlp", i)))
            for i in range(self.depth)
        ]
        return masks.count(Key("emb")), blocks

    def spec_for(self, embed_dim: int, blocks: list[BlockDims]) -> SegmenterSpec:
        """The spec of the dense model with widths ``embed_dim`` and ``blocks``.

        The attention scale stays the dense one (NViT keeps 64^-½ after QK pruning). ``num_heads``
        has no effect once ``blocks`` is given; it is set to the largest divisor of E that is at
        most the dense head count, because the spec (and the timm ViT it is built on) require E
        to be divisible by it.
        """
        heads = max(h for h in range(1, self.spec.num_heads + 1) if embed_dim % h == 0)
        return dataclasses.replace(
            self.spec, embed_dim=embed_dim, num_heads=heads, attn_scale=self.scale,
            blocks=[dataclasses.replace(b) for b in blocks],
        )

    def pruned_spec(self, masks: Masks) -> SegmenterSpec:
        """The spec of the physically smaller model the masks describe."""
        return self.spec_for(*self.widths(masks))

    # ------------------------------------------------------------------ attention index maps

    def qkv_rows(self, i: int, heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Rows of block ``i``'s ``qkv`` weight belonging to the given heads × qk dims × v dims.

        In the returned order (q then k then v; head-major), they form exactly the ``qkv`` layout
        of a block with ``len(heads)`` heads of widths ``len(qk)``, ``len(v)``.
        """
        d = self.dims[i]
        h, dq, dv = d.num_heads, d.qk_dim, d.v_dim
        q_rows = (heads[:, None] * dq + qk[None, :]).flatten()
        v_rows = (heads[:, None] * dv + v[None, :]).flatten()
        return torch.cat([q_rows, h * dq + q_rows, 2 * h * dq + v_rows])

    def proj_cols(self, i: int, heads: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Columns of block ``i``'s ``proj`` weight reading the given heads × v dims."""
        dv = self.dims[i].v_dim
        return (heads[:, None] * dv + v[None, :]).flatten()

    def qkv_mask(self, i: int, masks: Masks) -> torch.Tensor:
        """Float mask over block ``i``'s ``qkv`` outputs: 1 where head, QK and V dims are alive."""
        heads = masks[Key("heads", i)].float()
        qk = masks[Key("qk", i)].float()
        v = masks[Key("v", i)].float()
        q = (heads[:, None] * qk[None, :]).flatten()
        return torch.cat([q, q, (heads[:, None] * v[None, :]).flatten()])

    # ------------------------------------------------------------------ physical slicing

    def keep_indices(self, masks: Masks) -> dict[str, dict[int, torch.Tensor]]:
        """For every parameter that shrinks: ``{dim: kept indices}`` (applied in any order)."""
        out: dict[str, dict[int, torch.Tensor]] = {}

        def add(name: str, dim: int, index: torch.Tensor) -> None:
            entry = out.setdefault(name, {})
            if dim in entry:
                raise RuntimeError(f"{name} dim {dim} is indexed by two structures")
            entry[dim] = index

        emb = masks.keep_index(Key("emb"))
        if len(emb) < self.spec.embed_dim:
            for s in self.emb_slices:
                add(s.name, s.dim, emb)
        for i in range(self.depth):
            heads = masks.keep_index(Key("heads", i))
            qk, v = masks.keep_index(Key("qk", i)), masks.keep_index(Key("v", i))
            d = self.dims[i]
            if (len(heads), len(qk), len(v)) != (d.num_heads, d.qk_dim, d.v_dim):
                rows = self.qkv_rows(i, heads, qk, v)
                add(f"encoder.blocks.{i}.attn.qkv.weight", 0, rows)
                add(f"encoder.blocks.{i}.attn.qkv.bias", 0, rows)
                add(f"encoder.blocks.{i}.attn.proj.weight", 1, self.proj_cols(i, heads, v))
            mlp = masks.keep_index(Key("mlp", i))
            if len(mlp) < d.mlp_hidden:
                for s in self.mlp_slices[i]:
                    add(s.name, s.dim, mlp)
        return out


# ---------------------------------------------------------------------------------- DepGraph


def _trace_channel_groups(model: Segmenter) -> tuple[list[ParamSlice], list[list[ParamSlice]]]:
    """The E group and each block's MLP-hidden group, as parameter slices, from torch-pruning.

    The E group is the dependency group of the patch embedding's output channels; the class and
    position tokens are declared to DepGraph as parameters pruned along their last dimension.
    Saliency sources (NViT's ``compute_criteria_from``): for E, the patch embedding's output
    (weight and bias) and the slices of the encoder blocks' Linear layers: the ``proj`` and ``fc2``
    output rows (and biases), the ``qkv`` and ``fc1`` input columns; not the LayerNorms, the
    class and position tokens or the decoder's input projection, which are only pruned with it.
    For the MLP, the ``fc1`` rows and bias (NViT: "fc1 rows and bias").
    """
    import torch_pruning as tp

    enc = model.encoder
    tokens = [p for n, p in enc.named_parameters(recurse=False) if p.ndim >= 2 and p.shape[-1] == model.spec.embed_dim]
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, *model.spec.crop, device=device)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example, unwrapped_parameters=[(p, p.ndim - 1) for p in tokens], verbose=False,
            )
    finally:
        model.train(was_training)
    names = _Names(model)
    emb = names.slices(graph.get_pruning_group(enc.patch_embed.proj, tp.prune_conv_out_channels, idxs=[0]),
                       _nvit_emb_source)
    mlps = [
        names.slices(graph.get_pruning_group(blk.mlp.fc1, tp.prune_linear_out_channels, idxs=[0]),
                     lambda name, module, produces: produces)
        for blk in enc.blocks
    ]
    return emb, mlps


def _nvit_emb_source(name: str, module: nn.Module | None, produces: bool) -> bool:
    """Whether a slice of the E group counts in NViT's EMB saliency: the patch embedding's
    output and the Linear layers of the encoder blocks (``qkv``, ``proj``, ``fc1``, ``fc2``)."""
    if isinstance(module, nn.Conv2d):
        return produces and name == "encoder.patch_embed.proj"
    return isinstance(module, nn.Linear) and name.startswith("encoder.blocks.")


class _Names:
    """Turns a DepGraph group into parameter slices named as in ``model.named_parameters()``."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {m: n for n, m in model.named_modules()}
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.unwrapped_dims = {id(p): p.ndim - 1 for p in model.parameters()}

    def slices(self, group: object, source: Callable[[str, nn.Module | None, bool], bool]) -> list[ParamSlice]:
        """The group's slices; ``source(module name, module, produces)`` says which count in the
        saliency (``module`` is None for a bare parameter such as the class token)."""
        out: list[ParamSlice] = []
        for dep, _idxs in group:  # type: ignore[attr-defined]
            target = dep.target.module
            fn = getattr(dep.handler, "__name__", str(dep.handler))
            if fn not in ("prune_out_channels", "prune_in_channels"):
                raise NotImplementedError(f"unexpected pruning function {fn} in a dependency group")
            produces = fn == "prune_out_channels"
            if isinstance(target, nn.Parameter):
                name = self.params[id(target)]
                out.append(ParamSlice(name, self.unwrapped_dims[id(target)], source(name, None, produces)))
                continue
            if target not in self.modules:  # a functional op of the trace (add, reshape, concat)
                continue
            name = self.modules[target]
            own = dict(target.named_parameters(recurse=False))
            if not own:
                continue
            if not isinstance(target, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                raise NotImplementedError(f"{name} ({type(target).__name__}) is coupled to a pruned channel; "
                                          "only Linear, Conv2d and LayerNorm layers are supported")
            counts = source(name, target, produces)
            if produces:
                out.extend(ParamSlice(f"{name}.{p}", 0, counts) for p in own)
            else:
                out.append(ParamSlice(f"{name}.weight", 1, counts))
        return out
