"""``segcompress finetune``: recover the accuracy of a pruned (or merged) model, NViT style.

    segcompress finetune --model models/ade20k/vit-s/nvit-50.safetensors --teacher dense \\
        --recipe '{"iters": 8000, "lr": 1e-4, "kd_weight": 1.0, "kd_temperature": 1.0}' \\
        --layout ade20k --root data/ade20k --crop 512 --img-scale 2048 512 --seed 0 \\
        --out models/ade20k/vit-s/nvit-50-ft.safetensors

Segmenter's recipe through :func:`segcompress.train.fit` (SGD, poly schedule) plus, with a
teacher, the per-pixel KL to the dense model (``loss = ce + kd_weight · T²·KL``). ``--recipe``
takes the :class:`segcompress.train.Recipe` keys plus ``kd_weight`` (default 1.0),
``kd_temperature`` (default 1.0; NViT used 20 for ImageNet logits) and ``train_mode`` (default
false: NViT fine-tunes in eval mode, i.e. without dropout / drop-path). ``--teacher dense`` is the
``dense.safetensors`` beside ``--model``; ``none`` trains on the labels only. ``--method``/``--knob``
attach a token method while fine-tuning (prune-then-merge); the saved checkpoint is the bare model,
the method is attached again at evaluation. A method whose policy trains with the model (DToP's
heads: the reference's second phase, exits on) also writes the fine-tuned policy to
``--policy-out`` and, to ``--match-out``, the ``--knob`` match file with its knob naming that
policy. A killed run continues from ``<out>.resume/``;
several GPUs: ``torchrun --nproc_per_node N -m segcompress finetune ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from segcompress.commands._conventions import add_device_argument, resolve_device
from segcompress.commands.prune import add_data_arguments, training_dataset
from segcompress.progress import add_progress_argument

log = logging.getLogger("segcompress.finetune")

EXIT_STOPPED = 75  # as ``segcompress train``: stopped at --stop-at, rerun to continue
KD_KEYS = {"kd_weight": 1.0, "kd_temperature": 1.0, "train_mode": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model to fine-tune (.safetensors with its .json spec)")
    parser.add_argument("--teacher", default="dense",
                        help="'dense' (dense.safetensors beside --model), 'none', or a checkpoint path")
    parser.add_argument("--recipe", default="{}",
                        help="Recipe keys plus kd_weight, kd_temperature, train_mode; inline JSON or a .json file")
    add_data_arguments(parser)
    parser.add_argument("--method", default="dense", help="token method attached while fine-tuning (default: dense)")
    parser.add_argument("--knob", default=None, metavar="JSON",
                        help="the method's knob as JSON, or a JSON file (@FILE or *.json; a match result's 'knob')")
    parser.add_argument("--policy-out", type=Path, metavar="SAFETENSORS",
                        help="where the fine-tuned policy of a method whose policy trains with the model "
                             "(dtop's heads) is written; required for such a method")
    parser.add_argument("--match-out", type=Path, metavar="JSON",
                        help="with --policy-out: the --knob match file, its knob naming the fine-tuned policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order, augmentation, drop-path")
    parser.add_argument("--out", required=True, type=Path, help="fine-tuned checkpoint (.safetensors)")
    add_device_argument(parser)  # auto: a GPU per process (torchrun) when CUDA is available
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_progress_argument(parser)
    parser.add_argument("--stop-at", type=int, default=None,
                        help=f"stop after this many iterations, keeping the resume point (exit status {EXIT_STOPPED})")


def teacher_path(model: Path, teacher: str) -> Path | None:
    """Resolve ``--teacher``: ``dense`` -> ``<model dir>/dense.safetensors``, ``none`` -> None."""
    if teacher == "none":
        return None
    path = model.with_name("dense.safetensors") if teacher == "dense" else Path(teacher)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: teacher checkpoint not found (--teacher {teacher}; use 'none' for no distillation)")
    return path


def policy_match(args: argparse.Namespace, knob: dict[str, Any]) -> dict[str, Any]:
    """The ``--knob`` file as a match result (a bare knob file: ``{"knob": ...}``), read before
    training so that a bad file fails before any work."""
    from segcompress.commands._evaluation import read_match

    match = read_match(Path(args.knob.lstrip("@")))
    return {**match, "knob": knob} if "knob" in match else {"knob": knob}


def write_policy(args: argparse.Namespace, method: Any, bare: Any, match: dict[str, Any],
                 meta: dict[str, str]) -> None:
    """The attached method's fine-tuned policy (``--policy-out``) and the match file whose knob
    names it (``--match-out``). An input-dependent method's cost moved with the fine-tuning: it is
    measured again, on the fine-tuned model and policy and as many val images as the match was
    solved on, and the file's achieved GFLOPs and verdict are replaced (``remeasured``)."""
    from segcompress import methods
    from segcompress.io import write_json

    methods.get(args.method).code().save_policy(method.cpu(), bare.spec, args.policy_out,
                                                 {**meta, "seed": str(args.seed)})
    knob = {**match["knob"], "policy_file": str(args.policy_out)}
    out = {**match, "knob": knob, "policy_finetuned": True, "finetuned_model": str(args.out)}
    if methods.get(args.method).input_dependent and "target_gflops" in match:
        from segcompress.tokens.cost import image_crops

        n = int(match.get("calibration_images") or 8)
        images = list(image_crops(args.layout, args.root, "val", bare.spec.crop, n))
        cost = methods.method_cost(args.method, knob, bare.spec, bare, images)
        target, tolerance = float(match["target_gflops"]), float(match.get("tolerance") or 0.01)
        ok = abs(cost.mean - target) <= tolerance * target
        out.update(achieved_gflops=cost.mean, gflops_std=cost.std, within_tolerance=ok,
                   achieved_fraction=cost.mean / float(match["dense_gflops"]), calibration_images=len(images),
                   message="" if ok else (f"after fine-tuning, {args.method} at this knob costs {cost.mean:.4g} "
                                          f"GFLOPs, not within {tolerance:.0%} of the target {target:.4g}"),
                   remeasured="after fine-tuning, on the fine-tuned model and policy")
        if "reference_gflops" in match:
            out["reference_fraction"] = cost.mean / float(match["reference_gflops"])
    write_json(args.match_out, out)
    log.info("wrote %s and %s", args.policy_out, args.match_out)


def main(args: argparse.Namespace) -> int:
    import torch

    from segcompress import distributed
    from segcompress.commands._evaluation import parse_knob
    from segcompress.commands._model_options import parse_json_arg, require_safetensors_out
    from segcompress.data.datasets import collate_train
    from segcompress import methods
    from segcompress.methods import apply_method
    from segcompress.models.checkpoint import load_model, save_model
    from segcompress.resume import clear_resume, resume_dir_for
    from segcompress.train import Distillation, Output, Recipe, Runtime, fit

    if args.threads:
        torch.set_num_threads(args.threads)
    require_safetensors_out(args.out)
    data = parse_json_arg(args.recipe, "--recipe")
    extra = {k: data.pop(k, v) for k, v in KD_KEYS.items()}
    if not isinstance(extra["train_mode"], bool):
        raise ValueError("--recipe: 'train_mode' must be true or false")
    recipe = Recipe.from_dict(data, source="--recipe")
    knob = parse_knob(args.knob) if args.knob else {}
    trains_policy = args.method != "dense" and methods.get(args.method).policy_trains
    if trains_policy and (args.policy_out is None or args.match_out is None):
        raise ValueError(f"--method {args.method} fine-tunes its policy with the model: give --policy-out and --match-out")
    if not trains_policy and (args.policy_out is not None or args.match_out is not None):
        raise ValueError(f"--policy-out/--match-out: --method {args.method} has no policy that trains with the model")
    if args.match_out is not None and not (args.knob and Path(args.knob.lstrip("@")).is_file()):
        raise ValueError("--match-out copies the --knob match file: give --knob as a file")
    match = None
    if trains_policy:
        require_safetensors_out(args.policy_out, "--policy-out")
        match = policy_match(args, knob)

    model = load_model(args.model)
    tpath = teacher_path(args.model, args.teacher)
    teacher = load_model(tpath) if tpath is not None and float(extra["kd_weight"]) > 0 else None
    if teacher is not None and tuple(teacher.spec.crop) != tuple(model.spec.crop):
        raise ValueError(f"teacher {tpath} has crop {teacher.spec.crop}, the model {model.spec.crop}")
    dataset = training_dataset(args, model.spec)
    attached = args.method != "dense"
    net = apply_method(model, args.method, knob) if attached else model
    log.info("fine-tuning %s (%s) for %d iterations, teacher %s", args.model, args.method, recipe.iters,
             tpath if teacher is not None else "none")
    meta = {"finetuned_from": str(args.model), "teacher": str(tpath) if teacher is not None else "none",
            "method": args.method, "knob": json.dumps(knob, sort_keys=True), "kd": json.dumps(extra, sort_keys=True)}
    resume_dir = resume_dir_for(args.out)
    device = None if args.device == "auto" else resolve_device(args.device)
    info = distributed.init_distributed(device)  # joins torchrun's process group, if any
    try:
        # with a method attached, fit must not write the checkpoint: the method's own modules
        # would be in it; the bare model is written below instead
        result = fit(
            net, dataset, recipe, seed=args.seed, output=Output(None if attached else args.out, resume_dir, meta),
            distill=None if teacher is None else Distillation(
                teacher, float(extra["kd_weight"]), float(extra["kd_temperature"])),
            collate_fn=collate_train, train_mode=extra["train_mode"],
            runtime=Runtime(device=info.device, stop_at=args.stop_at, progress=args.progress),
        )
        if attached and result.completed and info.is_main:
            method = result.model.token_method
            bare = apply_method(result.model, "dense", {})
            save_model(bare.cpu(), args.out, metadata={**meta, "seed": str(args.seed), "iters": str(result.step)})
            if trains_policy:
                assert match is not None
                write_policy(args, method, bare, match, meta)
            clear_resume(resume_dir)
    finally:
        distributed.cleanup_distributed()
    if not result.completed:
        log.info("stopped at iteration %d of %d; run the same command again to continue", result.step, recipe.iters)
        return EXIT_STOPPED
    return 0
