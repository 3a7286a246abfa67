"""Segmenter's training recipe as one reusable loop: :func:`fit`.

The recipe (Strudel et al. 2021, ``segm/train.py``): SGD with momentum 0.9, weight decay 0, a
per-iteration poly schedule ``lr = (lr0 - min_lr)(1 - t/T)^0.9 + min_lr`` without warm-up,
pixel-wise cross-entropy that ignores label 255, drop-path as set in the model's spec, AMP off.
Those are the :class:`Recipe` defaults; its options beyond the reference (AdamW, a linear
warm-up, the loss on a strided subset of pixels) serve small from-scratch runs such as the
embedded default study.
Dense training, NViT fine-tuning (per-pixel KL to a dense teacher, :class:`Distillation`) and
token-method fine-tuning all call :func:`fit`.

Determinism. Every random stream is derived from one seed (:mod:`segcompress.seeding`):

* the data stream is a function of the world batch only: sample position ``p`` of the run
  (iteration ``t`` holds positions ``t*B .. t*B+B-1``) reads item ``perm_e[p mod n]`` of the
  permutation of epoch ``e = p // n``, and the item's augmentation is drawn after reseeding the
  global ``random``/NumPy/torch generators from ``(seed, p)`` -- so it does not depend on the
  number of loader workers, ranks or restarts. Datasets must draw their randomness from those
  global generators;
* model-side randomness (drop-path, dropout) is reseeded at every iteration from
  ``(seed, t, rank)``.

So a resume point needs no generator states: model, optimizer (momentum buffers), AMP scaler and
the iteration count restore the run exactly, and a run interrupted and resumed ends with the same
weights as one that was not. With ``W`` processes each rank takes the contiguous slice
``[r*B/W, (r+1)*B/W)`` of every world batch and the loss is normalised by the world's count of
labelled pixels, so the gradient is the one of a single process on the whole world batch
(equal up to float summation order when the model has no stochastic layers; drop-path masks
differ with ``W``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from segcompress import distributed
from segcompress.progress import Progress
from segcompress.resume import clear_resume, latest_resume, load_resume, resume_dir_for, save_resume
from segcompress.seeding import derive_seed, preserved_global_rng, seed_everything
from segcompress.settings import Settings

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
OPTIMIZERS = ("sgd", "adamw")


# --------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe(Settings):
    """Optimisation settings of one training run (defaults: Segmenter on ADE20K).

    Args:
        iters: optimizer steps T (ADE20K 160k, Cityscapes 80k).
        batch_size: world batch, split evenly over the processes.
        lr: base learning rate lr0 (ADE20K 1e-3, Cityscapes 1e-2).
        min_lr: the poly schedule's floor.
        momentum: SGD momentum.
        weight_decay: weight decay, SGD's or AdamW's decoupled one (not applied to biases, norms,
            position/class embeddings).
        poly_power: exponent of the poly schedule.
        checkpoint_every: write a resume point every this many iterations (0: never).
        log_every: log loss and lr every this many iterations (0: never).
        num_workers: data-loader worker processes per rank (0: load in the training process).
        amp: mixed precision (float16 + loss scaling on CUDA, bfloat16 on CPU).
        optimizer: ``sgd`` (Segmenter's) or ``adamw`` (betas 0.9, 0.999; ``momentum`` unused).
        warmup_iters: linear warm-up of the lr over the first N iterations (0: none, Segmenter).
        loss_stride: the loss is taken on every ``loss_stride``-th pixel row and column of the
            crop, at an offset drawn per iteration (seeded), with the logits bilinearly upsampled
            exactly there; an unbiased estimate of the full-resolution loss at about
            ``1/loss_stride²`` of its cost. 1 (Segmenter): every pixel. Needs a model with
            ``forward_masks`` (a :class:`~segcompress.models.segmenter.Segmenter`).
    """

    iters: int = 160_000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    momentum: float = 0.9
    weight_decay: float = 0.0
    poly_power: float = 0.9
    checkpoint_every: int = 1000
    log_every: int = 50
    num_workers: int = 4
    amp: bool = False
    optimizer: str = "sgd"
    warmup_iters: int = 0
    loss_stride: int = 1

    what = "recipe"
    accepts_none = False  # from_dict(None) is refused, as any non-mapping

    #: settings that do not change the trained weights (may differ between a run and its resume)
    BOOKKEEPING = ("checkpoint_every", "log_every", "num_workers")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.iters >= 1, "iters", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.min_lr <= self.lr, "min_lr", "between 0 and lr"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.poly_power > 0, "poly_power", "> 0"),
            (self.checkpoint_every >= 0, "checkpoint_every", ">= 0"),
            (self.log_every >= 0, "log_every", ">= 0"),
            (self.num_workers >= 0, "num_workers", ">= 0"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.warmup_iters >= 0, "warmup_iters", ">= 0"),
            (self.loss_stride >= 1, "loss_stride", ">= 1"),
        ]
        self.require(checks, show_value=True)


def poly_lr(step: int, recipe: Recipe) -> float:
    """Learning rate of update ``step`` (0-based): ``(lr0 - min_lr)(1 - step/T)^power + min_lr``,
    times ``(step + 1) / warmup_iters`` during the warm-up."""
    frac = min(max(step, 0), recipe.iters) / recipe.iters
    lr = (recipe.lr - recipe.min_lr) * (1.0 - frac) ** recipe.poly_power + recipe.min_lr
    if step < recipe.warmup_iters:
        lr *= (max(step, 0) + 1) / recipe.warmup_iters
    return lr


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters (:func:`param_groups`)."""
    groups = param_groups(model, recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters; with weight decay, biases, norms and embeddings get none (timm's rule)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    no_decay = ("pos_embed", "cls_token", "cls_emb")
    skip = [p for n, p in params if p.ndim <= 1 or n.split(".")[-1] in no_decay]
    skip_ids = {id(p) for p in skip}
    decay = [p for _, p in params if id(p) not in skip_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------- loss


def pixel_loss_sums(
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over labelled pixels of the cross-entropy and of the distillation term, and their count.

    The distillation term of a pixel is ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``
    (Hinton's scaling, as DeiT's soft distillation); pixels labelled ``ignore_index`` (including
    padding) count for neither term.

    Args:
        logits: student logits (B, K, H, W).
        labels: (B, H, W) class indices, ``ignore_index`` = unlabelled.
        teacher_logits: teacher logits like ``logits``, or ``None`` (then the KD sum is 0).

    Returns:
        (ce_sum, kd_sum, count) as 0-d tensors (count in float64).
    """
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)} (want (B, H, W))")
    labels = labels.reshape(-1)
    rows = _class_last(logits)
    ce_sum = F.cross_entropy(rows, labels, ignore_index=ignore_index, reduction="sum")
    valid = labels != ignore_index
    count = valid.sum().double()  # exact beyond 2**24 pixels
    if teacher_logits is None:
        return ce_sum, torch.zeros((), device=logits.device, dtype=logits.dtype), count
    t = temperature
    kl = F.kl_div(
        F.log_softmax(rows / t, dim=1), F.log_softmax(_class_last(teacher_logits) / t, dim=1),
        reduction="none", log_target=True,
    ).sum(dim=1)
    return ce_sum, (kl * valid).sum() * (t * t), count


def _class_last(logits: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits as (B·H·W, K) rows: a view for Segmenter's channels-last logits.

    Softmax losses over the last, contiguous axis are several times faster on CPU than over
    dim 1 of a channels-last tensor (and than over dim 1 of NCHW, which this copies once).
    """
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def bilinear_rows(out_size: int, in_size: int, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of the (out_size, in_size) matrix of 1-D bilinear upsampling.

    The weights of ``F.interpolate(mode="bilinear", align_corners=False)`` along one axis: output
    pixel ``i`` samples the input at ``(i + 0.5) * in/out - 0.5``, clamped at the borders.
    """
    src = ((index.double() + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.double()
    rows = torch.zeros((len(index), in_size), dtype=torch.float64)
    rows.scatter_add_(1, lo[:, None], (1.0 - frac)[:, None])
    rows.scatter_add_(1, hi[:, None], frac[:, None])
    return rows


def sampled_logits(masks: torch.Tensor, size: Sequence[int], stride: int, offset: Sequence[int]) -> torch.Tensor:
    """The pixels ``offset + stride * (i, j)`` of ``masks`` upsampled bilinearly to ``size``.

    Equal to ``F.interpolate(masks, size, mode="bilinear")[..., oy::stride, ox::stride]`` without
    computing the other pixels (two small matrix products over the grid).

    Args:
        masks: grid logits (B, K, gh, gw), e.g. :meth:`Segmenter.forward_masks`.
        size: the full-resolution (H, W).
        stride: sampling stride (the recipe's ``loss_stride``).
        offset: (oy, ox), each in ``[0, stride)``.

    Returns:
        (B, K, ceil((H - oy) / stride), ceil((W - ox) / stride)) logits, channels-last in memory.
    """
    (h, w), (oy, ox) = size, offset
    gh, gw = masks.shape[-2:]
    ry = bilinear_rows(h, gh, torch.arange(oy, h, stride)).to(masks.device, masks.dtype)
    rx = bilinear_rows(w, gw, torch.arange(ox, w, stride)).to(masks.device, masks.dtype)
    grid = masks.permute(0, 2, 3, 1)  # (B, gh, gw, K)
    rows = torch.matmul(ry, grid.flatten(2)).unflatten(2, (gw, grid.shape[-1]))  # (B, ny, gw, K)
    return torch.matmul(rx, rows).permute(0, 3, 1, 2)  # (B, K, ny, nx), channels-last


def loss_offset(seed: int, step: int, stride: int) -> tuple[int, int]:
    """The (row, column) offset of iteration ``step``'s loss pixels (the same on every rank)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "loss", step))
    oy, ox = torch.randint(0, stride, (2,), generator=gen).tolist()
    return oy, ox


class _GridLogits(nn.Module):
    """A model's grid logits (``forward_masks``) as its forward, for the strided loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "forward_masks"):
            raise ValueError(
                f"recipe key 'loss_stride' > 1 needs a model with forward_masks (a Segmenter), "
                f"got {type(model).__name__}; set loss_stride to 1"
            )
        self.model = model

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model.forward_masks(img)


# ----------------------------------------------------------------------------------------- data


class WorldBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of each world batch, as ``(item index, sample seed)`` pairs.

    Iteration ``t`` holds the run's sample positions ``t*B .. t*B+B-1``; rank ``r`` of ``W`` takes
    the contiguous slice ``[r*B/W, (r+1)*B/W)``. Position ``p`` is item ``perm_e[p mod n]`` of the
    seeded permutation of epoch ``e = p // n`` (epochs run into each other; nothing is dropped).

    Args:
        num_items: dataset length n.
        world_batch: B (divisible by ``world_size``).
        rank, world_size: this process and the number of processes.
        seed: the run's seed.
        start, end: iterations to yield batches for (``end`` exclusive).
    """

    def __init__(
            self, num_items: int, world_batch: int, rank: int, world_size: int, seed: int, start: int, end: int,
    ) -> None:
        if world_batch % world_size:
            raise ValueError(f"world batch {world_batch} is not divisible by {world_size} processes")
        self.num_items, self.world_batch, self.rank, self.world_size = num_items, world_batch, rank, world_size
        self.seed, self.start, self.end = seed, start, end
        self.local_batch = world_batch // world_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def positions(self, step: int) -> range:
        base = step * self.world_batch + self.rank * self.local_batch
        return range(base, base + self.local_batch)

    def item(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_items)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=gen)
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.end):
            yield [(self.item(p), derive_seed(self.seed, "sample", p)) for p in self.positions(step)]


class SeededItems(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is ``dataset[index]`` drawn with all global generators
    (``random``, NumPy, torch CPU) seeded from ``seed``; in the training process they are restored after."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if get_worker_info() is not None:
            return self._draw(index, seed)
        with preserved_global_rng():
            return self._draw(index, seed)

    def _draw(self, index: int, seed: int) -> Any:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.random.default_generator.manual_seed(seed)
        return self.dataset[index]


# ----------------------------------------------------------------------------------------- loop


@dataclass
class StepInfo:
    """What a callback sees after the loss of iteration ``step`` (1-based count of updates).

    ``loss``, ``ce`` and ``kd`` are world means over labelled pixels (``loss = ce + weight*kd``, the
    :class:`Distillation` weight). In ``on_grad`` the gradients are present (unscaled) and the
    optimizer has not stepped yet.
    """

    step: int
    iters: int
    lr: float
    loss: float
    ce: float
    kd: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rank: int
    world_size: int


@dataclass(frozen=True)
class Distillation:
    """Per-pixel distillation to a dense teacher: ``loss = ce + weight * kd`` (:func:`pixel_loss_sums`).

    Args:
        teacher: the teacher; :func:`fit` moves it to the training device and keeps it in eval mode,
            without gradients.
        weight: weight of the distillation term.
        temperature: distillation temperature T.
    """

    teacher: nn.Module
    weight: float = 1.0
    temperature: float = 1.0


@dataclass(frozen=True)
class Callbacks:
    """Hooks into :func:`fit`'s iterations, each called with a :class:`StepInfo`.

    Args:
        on_grad: called after backward, before the optimizer step (e.g. gradient-based importance).
        on_step: called after each optimizer step; returning ``True`` ends the run early (as
            finished). Under several processes it must return the same on every rank.
    """

    on_grad: Callable[[StepInfo], None] | None = None
    on_step: Callable[[StepInfo], bool | None] | None = None


@dataclass(frozen=True)
class Output:
    """What :func:`fit` writes.

    Args:
        path: final checkpoint (``.safetensors``, written by rank 0 with ``save_model``); ``None``
            writes nothing at the end.
        resume_dir: resume folder; default ``<path without suffix>.resume`` when ``path`` is given,
            else no resume points.
        metadata: extra string metadata for the final safetensors file.
    """

    path: str | Path | None = None
    resume_dir: str | Path | None = None
    metadata: dict[str, str] | None = None

    def resume_folder(self) -> str | Path | None:
        """``resume_dir``, else the default beside ``path``, else ``None`` (no resume points)."""
        if self.resume_dir is None and self.path is not None:
            return resume_dir_for(self.path)
        return self.resume_dir


@dataclass(frozen=True)
class Runtime:
    """How one :func:`fit` call executes: device, job control, display.

    Args:
        device: default: this rank's GPU, else the CPU.
        stop_at: stop once this many iterations are done, writing a resume point there and
            returning ``completed=False`` (time-limited jobs; tests).
        find_unused_parameters: passed to DistributedDataParallel (models with unused parameters).
        progress: ``auto``, ``on`` or ``off`` on rank 0 (:mod:`segcompress.progress`); besides the
            ``log_every`` lines.
    """

    device: str | torch.device | None = None
    stop_at: int | None = None
    find_unused_parameters: bool = False
    progress: str | bool = "auto"


@dataclass
class FitResult:
    """Outcome of :func:`fit`.

    Args:
        model: the trained model (unwrapped, on the training device).
        step: iterations completed.
        completed: whether the run finished (final model written when ``Output.path`` was given);
            ``False`` when it stopped at ``Runtime.stop_at``, leaving its resume point.
        start_step: iteration this call started from (> 0 when it resumed).
        losses: world loss of each iteration this call ran.
        seconds: wall time of this call's iterations.
    """

    model: nn.Module
    step: int
    completed: bool
    start_step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit(
        model: nn.Module,
        dataset: Dataset,
        recipe: Recipe,
        *,
        seed: int,
        output: Output | None = None,
        distill: Distillation | None = None,
        callbacks: Callbacks | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        train_mode: bool = True,
        runtime: Runtime | None = None,
) -> FitResult:
    """Train ``model`` on ``dataset`` with Segmenter's recipe; resumable and multi-process.

    Args:
        model: a Segmenter (or any module mapping (B,3,H,W) images to (B,K,H,W) logits); built
            identically on every rank. Its weights are replaced by a resume point's when one exists.
        dataset: items ``(image (3,H,W) float, label (H,W) int64)``, randomness from the global
            generators (see the module docstring).
        recipe: optimisation settings.
        seed: the run's seed (data order, augmentation, drop-path).
        output: final checkpoint, resume folder and metadata (default: nothing written).
        distill: per-pixel distillation to a dense teacher (default: none).
        callbacks: ``on_grad`` / ``on_step`` hooks (default: none).
        collate_fn: batches items; default stacks them (``torch.utils.data.default_collate``).
        train_mode: ``False`` keeps the model in eval mode (NViT fine-tunes so).
        runtime: device, ``stop_at``, DDP's ``find_unused_parameters`` and progress display
            (default: this rank's device, run to the end, a bar or heartbeat on rank 0).
    """
    output = Output() if output is None else output
    callbacks = Callbacks() if callbacks is None else callbacks
    runtime = Runtime() if runtime is None else runtime
    run = _setup(model, dataset, recipe, seed, output, distill, train_mode, runtime)
    loader = _build_loader(run, dataset, collate_fn)
    monitor = _Monitor(run, runtime.progress)
    step, stopped_early = _train_loop(run, loader, callbacks, monitor)
    seconds = monitor.close()
    completed = _finish(run, output, step, stopped_early, seconds)
    return FitResult(model, step, completed, run.start, monitor.losses, seconds)


# --------------------------------------------------------------------------------- loop: setup


@dataclass
class _Run:
    """The state one :func:`fit` call shares between its phases."""

    model: nn.Module  # the model being trained, unwrapped
    net: nn.Module  # what the forward pass calls: ``model``, its grid logits, wrapped in DDP
    teacher: nn.Module | None  # the teacher's forward (its grid logits with a strided loss)
    distill: Distillation | None
    recipe: Recipe
    seed: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int
    world: int
    resume_dir: str | Path | None
    meta: dict[str, Any]
    start: int
    end: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def kd_weight(self) -> float:
        return self.distill.weight if self.distill is not None else 1.0

    @property
    def kd_temperature(self) -> float:
        return self.distill.temperature if self.distill is not None else 1.0

    @property
    def use_scaler(self) -> bool:
        """AMP's loss scaling: float16 on CUDA only."""
        return self.recipe.amp and self.device.type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16


def _setup(
        model: nn.Module, dataset: Dataset, recipe: Recipe, seed: int, output: Output,
        distill: Distillation | None, train_mode: bool, runtime: Runtime,
) -> _Run:
    """Device, models, optimizer, AMP scaler and the resume point: everything but the data."""
    info = distributed.current()
    device = torch.device(runtime.device) if runtime.device is not None else info.device
    _check_inputs(dataset, recipe, info.world_size)
    resume_dir = output.resume_folder()
    teacher = distill.teacher if distill is not None else None
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(model, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.amp and device.type == "cuda")
    meta = _run_meta(model, dataset, recipe, seed, distill)
    start = _resume(resume_dir, meta, model, optimizer, scaler, info.is_main, recipe.iters)
    end = recipe.iters if runtime.stop_at is None else min(recipe.iters, max(runtime.stop_at, start))
    net, teacher_net = _forward_nets(model, teacher, recipe.loss_stride, info.world_size, device,
                                     runtime.find_unused_parameters)
    net.train(train_mode)
    return _Run(model, net, teacher_net, distill, recipe, seed, optimizer, scaler, device, info.rank, info.world_size,
                resume_dir, meta, start, end)


def _check_inputs(dataset: Dataset, recipe: Recipe, world: int) -> None:
    if recipe.batch_size % world:
        raise ValueError(f"recipe batch_size {recipe.batch_size} (world batch) is not divisible by {world} processes")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("the training dataset is empty")


def _resume(
        resume_dir: str | Path | None, meta: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, is_main: bool, iters: int,
) -> int:
    """Load the latest resume point in ``resume_dir`` (after checking it is this run's); its iteration, else 0."""
    point = latest_resume(resume_dir) if resume_dir is not None else None
    if point is None:
        return 0
    _check_resume_meta(point.meta, meta, Path(resume_dir))  # type: ignore[arg-type]
    load_resume(point, model, optimizer, scaler)
    if is_main:
        log.info("resuming from %s (iteration %d of %d)", point.path, point.step, iters)
    return point.step


def _forward_nets(
        model: nn.Module, teacher: nn.Module | None, stride: int, world: int, device: torch.device,
        find_unused_parameters: bool,
) -> tuple[nn.Module, nn.Module | None]:
    """The student's and the teacher's forward: grid logits for a strided loss, the student in DDP."""
    net: nn.Module = model if stride == 1 else _GridLogits(model)
    teacher_net = teacher if teacher is None or stride == 1 else _GridLogits(teacher)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    return net, teacher_net


def _build_loader(run: _Run, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None) -> DataLoader:
    """This rank's batches of iterations ``run.start .. run.end`` (:class:`WorldBatchSampler`)."""
    n_items = len(dataset)  # type: ignore[arg-type]
    sampler = WorldBatchSampler(n_items, run.recipe.batch_size, run.rank, run.world, run.seed, run.start, run.end)
    loader = DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=run.recipe.num_workers,
        collate_fn=collate_fn, pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(run.seed, "loader", run.rank)),
    )
    if run.is_main:
        log.info(
            "training %d items, world batch %d over %d process(es) on %s, iterations %d..%d of %d",
            n_items, run.recipe.batch_size, run.world, run.device, run.start, run.end, run.recipe.iters,
        )
    return loader


# ---------------------------------------------------------------------------------- loop: steps


def _train_loop(run: _Run, loader: DataLoader, callbacks: Callbacks, monitor: _Monitor) -> tuple[int, bool]:
    """Iterations ``run.start .. run.end``; the iterations done and whether ``on_step`` ended the run."""
    step = run.start
    for images, labels in loader:
        info = _train_step(run, step, images, labels, callbacks.on_grad)
        step = info.step
        monitor.record(info)
        if callbacks.on_step is not None and callbacks.on_step(info):
            return step, True
        if _resume_point_due(run, step):
            save_resume(run.resume_dir, step, run.model, run.optimizer, run.meta, run.scaler)  # type: ignore[arg-type]
    return step, False


def _train_step(
        run: _Run, t: int, images: torch.Tensor, labels: torch.Tensor,
        on_grad: Callable[[StepInfo], None] | None,
) -> StepInfo:
    """Iteration ``t`` (0-based): lr, model-side seed, loss, backward, ``on_grad``, optimizer step."""
    lr = poly_lr(t, run.recipe)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    seed_everything(derive_seed(run.seed, "step", t, run.rank))
    images = images.to(run.device, non_blocking=True)
    labels = labels.to(run.device, non_blocking=True)
    loss, loss_value, ce, kd = _loss(run, t, images, labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    step = t + 1
    if on_grad is not None:
        run.scaler.unscale_(run.optimizer)
        on_grad(_step_info(run, step, lr, loss_value, ce, kd))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return _step_info(run, step, lr, loss_value, ce, kd)


def _step_info(run: _Run, step: int, lr: float, loss: float, ce: float, kd: float) -> StepInfo:
    return StepInfo(step, run.recipe.iters, lr, loss, ce, kd, run.model, run.optimizer, run.rank, run.world)


def _loss(run: _Run, t: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
    """Iteration ``t``'s loss to backpropagate (normalised by the world's labelled pixels) and its
    world means: the loss, ``ce`` and ``kd``."""
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.recipe.amp):
        logits = run.net(images)
        teacher_logits = None
        if run.teacher is not None:
            with torch.no_grad():
                teacher_logits = run.teacher(images).float()
    stride = run.recipe.loss_stride
    method = getattr(run.model, "token_method", None)
    offset = loss_offset(run.seed, t, stride) if stride > 1 else (0, 0)
    aux = None if method is None else method.training_loss(labels, stride, offset)
    if stride > 1:
        logits, teacher_logits, labels = _loss_pixels(run.seed, t, stride, images.shape[-2:], logits,
                                                      teacher_logits, labels)
    ce_sum, kd_sum, count = pixel_loss_sums(logits.float(), labels, teacher_logits, run.kd_temperature)
    aux_value = torch.zeros((), dtype=torch.float64, device=count.device) if aux is None else aux.detach().double()
    stats = torch.stack([count, ce_sum.detach().double(), kd_sum.detach().double(), aux_value])
    if run.world > 1:
        dist.all_reduce(stats)
    denom = stats[0].clamp(min=1.0)
    loss = (ce_sum + run.kd_weight * kd_sum) * (run.world / denom).float()
    if aux is not None:  # the attached method's own terms (DToP's heads): a per-process mean, which
        loss = loss + aux  # DDP's gradient averaging turns into the mean over the processes
    ce, kd = (stats[1:3] / denom).tolist()
    loss_value = ce + run.kd_weight * kd + float(stats[3]) / run.world
    if not math.isfinite(loss_value) and not run.use_scaler:
        raise ValueError(
            f"training loss is {loss_value} at iteration {t + 1}; lower the recipe's 'lr' or check the labels"
        )
    return loss, loss_value, ce, kd


def _loss_pixels(
        seed: int, t: int, stride: int, size: Sequence[int], logits: torch.Tensor,
        teacher_logits: torch.Tensor | None, labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Logits, teacher logits and labels at iteration ``t``'s strided loss pixels (:func:`loss_offset`)."""
    offset = loss_offset(seed, t, stride)
    logits = sampled_logits(logits.float(), size, stride, offset)
    if teacher_logits is not None:
        teacher_logits = sampled_logits(teacher_logits, size, stride, offset)
    return logits, teacher_logits, labels[:, offset[0]::stride, offset[1]::stride]


# ------------------------------------------------------------------ loop: logging, checkpoints


class _Monitor:
    """A run's losses, progress bar and ``log_every`` lines (rank 0 shows and logs)."""

    def __init__(self, run: _Run, progress: str | bool) -> None:
        self.run = run
        self.losses: list[float] = []
        self._window: list[float] = []
        self._t0 = self._t_log = time.perf_counter()
        self._bar = Progress(run.recipe.iters, "train", "it", progress if run.is_main else "off", initial=run.start)

    def record(self, info: StepInfo) -> None:
        """Count a finished iteration; log the mean loss since the last line when one is due."""
        self.losses.append(info.loss)
        self._window.append(info.loss)
        self._bar.update(1)
        every = self.run.recipe.log_every
        if every and (info.step % every == 0 or info.step == self.run.end):
            self._log(info)

    def _log(self, info: StepInfo) -> None:
        now = time.perf_counter()
        if self.run.is_main:
            iters = self.run.recipe.iters
            mean, sec = sum(self._window) / len(self._window), (now - self._t_log) / len(self._window)
            self._bar.set_postfix(loss=f"{mean:.4f}", lr=f"{info.lr:.2e}")
            log.info(
                "iter %d/%d  loss %.4f%s  lr %.3e  %.3f s/it  eta %s", info.step, iters, mean,
                f" (ce {info.ce:.4f} kd {info.kd:.4f})" if self.run.teacher is not None else "",
                info.lr, sec, _hms(sec * (iters - info.step)),
            )
        self._window, self._t_log = [], now

    def close(self) -> float:
        """Close the bar; the seconds since the monitor started."""
        self._bar.close()
        return time.perf_counter() - self._t0


def _resume_point_due(run: _Run, step: int) -> bool:
    """Whether rank 0 writes a resume point after ``step`` iterations: every ``checkpoint_every``
    and at the last iteration of this call, unless the run is finished."""
    if run.resume_dir is None or not run.is_main or step >= run.recipe.iters:
        return False
    every = run.recipe.checkpoint_every
    return bool(every and step % every == 0) or step == run.end


def _finish(run: _Run, output: Output, step: int, stopped_early: bool, seconds: float) -> bool:
    """Whether the run completed; if so rank 0 writes the final model and clears the resume points."""
    completed = stopped_early or step >= run.recipe.iters
    if completed and run.is_main:
        if output.path is not None:
            _save_final(run, output, step, seconds)
        if run.resume_dir is not None:
            clear_resume(run.resume_dir)
    if run.world > 1:
        dist.barrier()
    return completed


def _save_final(run: _Run, output: Output, step: int, seconds: float) -> None:
    """The trained model at ``output.path``, tagged with the seed, iterations, recipe and ``output.metadata``."""
    from segcompress.models.checkpoint import save_model

    tags = {"seed": str(run.seed), "iters": str(step), "recipe": _json(run.recipe.to_dict())}
    save_model(run.model, output.path, metadata={**tags, **(output.metadata or {})})  # type: ignore[arg-type]
    log.info("wrote %s after %d iterations (%.1f s)", output.path, step, seconds)


# -------------------------------------------------------------------------------------- helpers


def _run_meta(
        model: nn.Module, dataset: Dataset, recipe: Recipe, seed: int, distill: Distillation | None,
) -> dict[str, Any]:
    """What a resume point must agree with for the resumed run to be the same run."""
    spec = getattr(model, "spec", None)
    method = getattr(model, "token_method", None)
    return {
        "seed": seed,
        "method": None if method is None else {"name": method.name, "knob": method.knob()},
        "recipe": {k: v for k, v in recipe.to_dict().items() if k not in Recipe.BOOKKEEPING},
        "dataset_size": len(dataset),  # type: ignore[arg-type]
        "distill": {"weight": distill.weight, "temperature": distill.temperature} if distill is not None else None,
        "spec": spec.to_dict() if hasattr(spec, "to_dict") else None,
    }


def _check_resume_meta(saved: dict[str, Any], now: dict[str, Any], resume_dir: Path) -> None:
    now = _roundtrip(now)
    diff = []
    for key in sorted(set(saved) | set(now)):
        if key == "recipe":
            a, b = saved.get(key) or {}, now.get(key) or {}
            diff += [f"recipe.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif saved.get(key) != now.get(key):
            diff.append(key)
    if diff:
        raise ValueError(
            f"{resume_dir}: resume point was written by a run with a different {', '.join(diff)}; "
            "restore those settings or delete the folder to start over"
        )


def _roundtrip(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


__all__: Sequence[str] = (
    "Callbacks", "Distillation", "FitResult", "OPTIMIZERS", "Output", "Recipe", "Runtime", "SeededItems", "StepInfo",
    "WorldBatchSampler", "bilinear_rows", "build_optimizer", "fit", "loss_offset", "param_groups", "pixel_loss_sums",
    "poly_lr", "sampled_logits",
)
