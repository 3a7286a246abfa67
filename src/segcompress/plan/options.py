"""Params functions of the rules: the config turned into each command's options (text)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Callable

from segcompress import methods as registry
from segcompress.plan.inputs import Inputs
from segcompress.plan.paths import corrupt_manifest
from segcompress.plan.study import DENSE_CONTROL, Variant


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def input_dir(name: str) -> Callable[[Any, Any], str]:
    """Params function: the folder holding input file ``name`` (e.g. a dataset root)."""

    def folder(wildcards: Any, input: Any) -> str:
        return str(Path(input[name]).parent)

    return folder


def output_dir(name: str) -> Callable[[Any, Any], str]:
    """Params function: the folder holding output file ``name``."""

    def folder(wildcards: Any, output: Any) -> str:
        return str(Path(output[name]).parent)

    return folder


def corrupted_sets_dir(wildcards: Any, output: Any) -> str:
    """Params function: data/<ds>-c, the root of a dataset's corrupted sets."""
    return str(Path(output.manifest).parents[2])


def adopt_option(wildcards: Any, input: Any) -> str:
    """`` --from-checkpoint CKPT`` when a dense checkpoint replaces training, else nothing."""
    return f" --from-checkpoint {input.adopted}" if "adopted" in input.keys() else ""


class Options(Inputs):
    """Every config value a job uses is one of its params (Snakemake's params trigger reruns
    exactly the jobs that read an edited key)."""

    def config_json(self, dpath: str) -> Callable[[Any], str]:
        """Params function: the config entry at ``dpath`` ("a/{ds}/b": may hold wildcards) as compact JSON."""

        def as_json(wildcards: Any) -> str:
            value: Any = self.config
            for key in dpath.format(**dict(wildcards.items())).split("/"):
                value = value[key]
            return _compact(value)

        return as_json

    def pruner_settings(self, wildcards: Any) -> str:
        """``methods.<pruner>`` as compact JSON (keys left out take the method's defaults)."""
        return _compact(self.config["methods"].get(wildcards.pruner, {}))

    def policy_settings(self, wildcards: Any) -> str:
        """The settings of ``wildcards.method`` its policy depends on (its module's
        ``POLICY_SETTINGS``: the training recipe ``policy``, DToP's heads' shape) as compact JSON."""
        keys = registry.get(wildcards.method).code().POLICY_SETTINGS
        settings = self.settings(wildcards.method)
        return _compact({k: settings[k] for k in keys})

    def _dataset(self, wildcards: Any) -> dict[str, Any]:
        return self.config["datasets"][wildcards.ds]

    def data_options(self, wildcards: Any) -> str:
        """Generate the synthetic dataset; or, for a real one, prepare it (Cityscapes trainIds) and verify."""
        syn = self._dataset(wildcards).get("synthetic")
        if syn is None:
            return "--prepare"
        return f"--synthetic --num-train {syn['num_train']} --num-val {syn['num_val']} --seed {syn['seed']}"

    def training_data(self, wildcards: Any) -> str:
        """The training verbs' data options (resize scale, colour augmentation)."""
        ds = self._dataset(wildcards)
        scale = " ".join(map(str, ds["img_scale"]))
        return f"--img-scale {scale}" + ("" if ds["photometric"] else " --no-photometric")

    def eval_img_scale(self, wildcards: Any) -> str:
        ds = self._dataset(wildcards)
        return " ".join(map(str, ds["eval"]["img_scale"] or ds["img_scale"]))

    def eval_stride(self, wildcards: Any) -> str:
        stride = self._dataset(wildcards)["eval"]["stride"]
        return "" if stride is None else f"--stride {stride}"

    def eval_max_images(self, wildcards: Any) -> str:
        n = self._dataset(wildcards)["eval"]["max_images"]
        return "" if n is None else f"--max-images {n}"

    def finetune_recipe(self, wildcards: Any) -> str:
        """finetune.recipe as JSON, topped up to the fine-tuned model's post-compression budget."""
        method, _target = self.finetune_stem(wildcards.stem)
        return self.recipe_json(DENSE_CONTROL if method == "dense" else method)

    def finetune_method_options(self, wildcards: Any, input: Any) -> str:
        """--method/--knob of the model being fine-tuned (finetune.token_methods): the method its
        variant is evaluated with, and the knob of its match file."""
        method, _target = self.finetune_stem(wildcards.stem)
        applied = "dense" if method == "dense" else registry.get(method).applied
        return "--method dense" if applied == "dense" else f"--method {applied} --knob {input.match}"

    def match_options(self, wildcards: Any, input: Any) -> str:
        """`segcompress match` options beyond --target-fraction/--model/--out: the method it solves
        (prune-then-merge: ToMe on the pruned model) with its settings (methods.<name>) as JSON."""
        method = registry.get(registry.get(wildcards.method).applied)
        opts = [
            f"--method {method.name}",
            f"--settings {shlex.quote(_compact(self.settings(method.name)))}",
            f"--reference-model {input.dense}",
            f"--calib-root {Path(input.manifest).parent}",
            f"--calib-layout {self._dataset(wildcards)['layout']}",
            f"--calib-images {self.config['matching']['calibration_images']}",
            f"--tolerance {self.config['matching']['tolerance']}",
            f"--flops-per {self.config['flops']['per']}",
        ]
        if self.policy_of(wildcards.method):
            opts.append(f"--policy {input.policy}")
        return " ".join(opts)

    def _condition_options(self, wildcards: Any, conds: list[tuple[str, int]], paths: Any) -> str:
        """--condition options: one per (corruption, severity), with its image folder and output."""
        out = []
        for (c, s), path in zip(self.job_conditions(wildcards, conds), paths):
            img_root = "-" if c == "clean" else str(Path(corrupt_manifest(wildcards.ds, c, s)).parent)
            out.append(f"--condition {c} {s} {shlex.quote(img_root)} {shlex.quote(str(path))}")
        return " ".join(out)

    def eval_conditions(self, wildcards: Any, output: Any) -> str:
        """`segcompress evaluate` --condition options for the job's conditions."""
        return self._condition_options(wildcards, self.conditions(), output.rows)

    def rank_condition_options(self, wildcards: Any, output: Any) -> str:
        """`segcompress rank` --condition options for the job's conditions."""
        return self._condition_options(wildcards, self.rank_conditions(), output.rows)

    def condition_paths(self, folder: str, conds: list[tuple[str, int]]) -> list[str]:
        """Output patterns of one job's rows under ``folder``: one per condition of ``conds``, or the
        pattern of a single condition when jobs are cut per condition."""
        if self.per_condition:
            return [f"{folder}/{{ds}}/{{arch}}/{{variant}}/{{corruption}}/{{severity}}.json"]
        return [f"{folder}/{{ds}}/{{arch}}/{{variant}}/{c}/{s}.json" for c, s in conds]

    def job_name(self, prefix: str, suffix: str) -> str:
        """Log or benchmark path of an evaluate or rank job (per variant, or per condition)."""
        if self.per_condition:
            return f"{prefix}/{{ds}}/{{arch}}/{{variant}}/{{corruption}}-{{severity}}{suffix}"
        return f"{prefix}/{{ds}}/{{arch}}/{{variant}}{suffix}"

    def tags(self, v: Variant) -> dict[str, Any]:
        """Identity columns of a variant (no condition): what rank and bench rows are joined on."""
        tags: dict[str, Any] = {"dataset": v.dataset, "backbone": v.backbone, "variant": v.name, "method": v.method,
                                "seed": v.seed, "post_train_iters": self.post_train_iters(v.method)}
        if v.target is not None:
            tags["target_fraction"] = v.target
        return tags

    def variant_tags(self, wildcards: Any) -> str:
        """--tag options naming a variant (no condition)."""
        tags = self.tags(self.variant(wildcards.ds, wildcards.arch, wildcards.variant))
        return " ".join(f"--tag {k}={v}" for k, v in tags.items())

    def eval_method_options(self, wildcards: Any, input: Any) -> str:
        """--method/--match of a variant for `segcompress evaluate`. The match file holds the knob
        (with the method's settings) and the GFLOPs columns of the row: a `match` result, the
        `prune` report of a pruned model (evaluated as it is, `--method dense`), or the `flops`
        result of the dense model."""
        return f"--method {self.variant(wildcards.ds, wildcards.arch, wildcards.variant).applied} --match {input.match}"

    def rank_options(self, wildcards: Any) -> str:
        """`segcompress rank` settings from analysis.effective_rank; the images: its max_images,
        else the dataset's eval.max_images."""
        r = self.rank
        opts = [f"--feature {r['feature']}", "--centre" if r["centre"] else "--no-centre",
                f"--normalise {r['normalise']}", f"--windows {r['windows']}"]
        n = r["max_images"] if r["max_images"] is not None else self._dataset(wildcards)["eval"]["max_images"]
        if n is not None:
            opts.append(f"--max-images {n}")
        return " ".join(opts)

    def bench_outputs(self) -> list[str]:
        """Output patterns of a bench job: the row of every variant of one dataset, backbone and
        seed (they are timed one after another in one process)."""
        from segcompress.plan.paths import bench_row_path

        return [bench_row_path("{ds}", "{arch}", v.name) for v in self.variants("{ds}", "{arch}", "{seed}")]

    def bench_options(self, wildcards: Any, input: Any, output: Any) -> str:
        """`segcompress bench` settings: one --variant per variant of the seed (row, checkpoint,
        applied method, match file, identity tags), analysis.throughput, and the first val image
        as the input (input-dependent methods need a real image; every variant gets the same one)."""
        t, opts = self.throughput, []
        for i, v in enumerate(self.variants(wildcards.ds, wildcards.arch, wildcards.seed)):
            tags = ",".join(f"{k}={x}" for k, x in self.tags(v).items())
            opts.append(f"--variant {output[i]} {input[f'model{i}']} {v.applied} {input[f'match{i}']} {tags}")
        opts.append(f"--batch {t['batch']} --warmup {t['warmup']} --repeats {t['repeats']} --statistic {t['statistic']}"
                    f" --calib-root {Path(input.manifest).parent} --calib-layout {self._dataset(wildcards)['layout']}"
                    " --calib-images 1")
        return " ".join(opts)

    def qualitative_options(self, wildcards: Any, input: Any) -> str:
        """The --variant columns (title, checkpoint, applied method, match file) and the image set."""
        q = self.qualitative
        opts = [f"--variant {shlex.quote(title)} {input[f'model{i}']} {v.applied} {input[f'match{i}']}"
                for i, (title, v) in enumerate(self.qualitative_variants(wildcards.ds, wildcards.arch))]
        if q["corruption"] is not None:
            opts.append(f"--img-root {Path(input.images).parent}")
        opts += [f"--images {q['images']}", f"--zoom {q['zoom']}"]
        return " ".join(opts)

    def report_options(self, wildcards: Any) -> str:
        opts, out = self.config["report"], []
        if opts["corrupted_categories"]:
            out.append("--corrupted-categories " + " ".join(opts["corrupted_categories"]))
        if opts["corrupted_severities"]:
            out.append("--corrupted-severities " + " ".join(map(str, opts["corrupted_severities"])))
        out.append(f"--heatmap {opts['heatmap']}")
        return " ".join(out)

    def report_config(self) -> dict[str, Any]:
        """The config the report page describes (its header and open-question choices)."""
        sub = {k: self.config[k] for k in ("study", "finetune", "flops", "matching", "methods", "report", "analysis")}
        sub["datasets"] = {ds: {"eval": self.config["datasets"][ds]["eval"]} for ds in self.study["datasets"]}
        return sub

    def report_inputs(self) -> dict[str, Any]:
        """What `segcompress report --inputs` reads: the rows of the configured grid and the config
        (a file, so that no command line runs to kilobytes)."""
        return {"rows": self.evaluate_targets(), "rank": self.rank_targets(), "bench": self.bench_targets(),
                "qualitative": self.qualitative_targets(), "config": self.report_config()}
