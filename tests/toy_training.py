"""A tiny learnable segmentation task for the training tests, and a script entry for their subprocesses.

    python tests/toy_training.py crash OUT [--num-workers N]   # trains, SIGKILLs itself mid-run
    torchrun --standalone --nproc_per_node 2 tests/toy_training.py ddp OUT
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial

import torch

from tiny_segmenter import SEGMENTER_DROPOUT, tiny_model
from tiny_segmenter import tiny_spec as _tiny_spec

NUM_CLASSES = 3
COLORS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


class ToyScenes(torch.utils.data.Dataset):
    """Images of 8x8 coloured cells, one class per colour; items add random noise and flips
    drawn from the global generators (as a real dataset's augmentation would)."""

    def __init__(self, n: int = 16, size: int = 32, ignore_fraction: float = 0.1) -> None:
        g = torch.Generator().manual_seed(1234)
        cells = torch.randint(0, NUM_CLASSES, (n, size // 8, size // 8), generator=g)
        self.labels = cells.repeat_interleave(8, 1).repeat_interleave(8, 2)
        self.images = COLORS[self.labels].permute(0, 3, 1, 2).contiguous()
        ignore = torch.rand(self.labels.shape, generator=g) < ignore_fraction
        self.labels = self.labels.masked_fill(ignore, 255)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, lab = self.images[i] + 0.5 * torch.randn(self.images[i].shape), self.labels[i]
        if torch.rand(()) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img, lab


#: The toy task's spec: 32 px crops, 2 blocks, Segmenter's dropout (``tiny_model(tiny_spec(), seed, train=True)``).
tiny_spec = partial(_tiny_spec, num_classes=NUM_CLASSES, **SEGMENTER_DROPOUT)


def _main() -> int:
    from segcompress.train import Callbacks, Output, Recipe, Runtime, fit

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["crash", "ddp"])
    p.add_argument("out")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=5)
    a = p.parse_args()
    if a.mode == "crash":
        recipe = Recipe(iters=6, batch_size=4, lr=0.05, checkpoint_every=3, log_every=0, num_workers=a.num_workers)

        def die(info) -> None:  # a hard crash: no cleanup, no final checkpoint
            if info.step == a.kill_at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        fit(tiny_model(tiny_spec(), 0, train=True), ToyScenes(), recipe, seed=7, output=Output(a.out),
            callbacks=Callbacks(on_step=die), runtime=Runtime(device="cpu"))
        return 1  # not reached
    from segcompress import distributed

    distributed.init_distributed(device="cpu")
    recipe = Recipe(iters=4, batch_size=4, lr=0.05, checkpoint_every=2, log_every=1, num_workers=0)
    model = tiny_model(tiny_spec(drop_path_rate=0.0, decoder_dropout=0.0), 0, train=True)
    fit(model, ToyScenes(), recipe, seed=7, output=Output(a.out), runtime=Runtime(device="cpu"))
    distributed.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
