"""Input functions of the rules: what each job reads, from its wildcards and the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segcompress import methods as registry
from segcompress.plan.paths import (
    corrupt_manifest, dataset_manifest, dense_flops_path, finetuned_policy_paths, match_path, model_path, policy_path,
    prune_report_path,
)
from segcompress.plan.study import Study, Variant


class Inputs(Study):
    """``<rule>_inputs(wildcards)``: the files of one job."""

    def dense_checkpoint(self, wildcards: Any) -> str | None:
        """The configured dense checkpoint of (dataset, backbone) that replaces training, or None."""
        return self.dense_checkpoints.get(wildcards.ds, {}).get(wildcards.arch)

    def train_inputs(self, wildcards: Any) -> dict[str, str]:
        """The dataset manifest, and the dense checkpoint (with its spec) when one is configured."""
        inputs = {"manifest": dataset_manifest(wildcards.ds)}
        adopted = self.dense_checkpoint(wildcards)
        if adopted is not None:
            inputs.update(adopted=adopted, adopted_spec=str(Path(adopted).with_suffix(".json")))
        return inputs

    def match_inputs(self, wildcards: Any) -> dict[str, str]:
        """What solving ``method`` at ``target`` reads: the model it acts on, the dense reference, data."""
        ds, arch, seed = wildcards.ds, wildcards.arch, wildcards.seed
        dense = model_path(ds, arch, seed, "dense")
        inputs = {"dense": dense, "manifest": dataset_manifest(ds), "model": dense}
        method = registry.get(wildcards.method)
        if method.pruned:
            inputs["model"] = self.merge_base(ds, arch, seed, method.name, wildcards.target)
        if self.policy_of(method.name):
            inputs["policy"] = policy_path(ds, arch, seed, self.policy_of(method.name))
        return inputs

    def finetune_inputs(self, wildcards: Any) -> dict[str, str]:
        """What fine-tuning ``stem`` (dense: the dense control; nvit-F; or <matched method>-T) reads."""
        ds, arch, seed = wildcards.ds, wildcards.arch, wildcards.seed
        dense = model_path(ds, arch, seed, "dense")
        inputs = {"teacher": dense, "manifest": dataset_manifest(ds)}
        method, target = self.finetune_stem(wildcards.stem)
        if method == "dense":
            return {**inputs, "model": dense}
        if registry.get(method).applied == "dense":  # a pruned model, fine-tuned as it is
            return {**inputs, "model": model_path(ds, arch, seed, wildcards.stem)}
        assert target is not None
        inputs["match"] = match_path(ds, arch, seed, method, target)
        inputs["model"] = self.merge_base(ds, arch, seed, method, target) if registry.get(method).pruned else dense
        if self.policy_of(method):
            inputs["policy"] = policy_path(ds, arch, seed, self.policy_of(method))
        return inputs

    def finetune_stem(self, stem: str) -> tuple[str, str | None]:
        """(method, target) of a fine-tuned model's file stem, looked up among the planned ones:
        ``dense`` (the dense control), ``nvit-<fraction>``, ``<matched method>-<target>``; a model
        outside the grid, asked for by its path, is what its stem says."""
        if stem == "dense":
            return "dense", None
        planned = {f"{p}-{f}": (p, f) for p in self.pruners() for f in self.prune_fractions(p)}
        planned |= {f"{m}-{t}": (m, t) for m, t in self.compressed(registry.names(matched=True))}
        if stem in planned:
            return planned[stem]
        method, target = stem.rsplit("-", 1)
        registry.get(method)
        return method, target

    def variant_inputs(self, wildcards: Any) -> dict[str, str]:
        """A variant's checkpoint, its match (or GFLOPs) file, its method's policy (policy_<method>), the dataset manifest."""
        return self._variant_inputs(self.variant(wildcards.ds, wildcards.arch, wildcards.variant))

    def _variant_inputs(self, v: Variant) -> dict[str, str]:
        ds, arch, seed = v.dataset, v.backbone, v.seed
        inputs = {"model": self.variant_model(v), "manifest": dataset_manifest(ds)}
        if v.reference:
            inputs["match"] = dense_flops_path(ds, arch, seed)
        elif registry.get(v.method).applied == "dense":
            inputs["match"] = prune_report_path(ds, arch, seed, v.target or "", pruner=v.method)
        else:
            inputs["match"] = match_path(ds, arch, seed, v.method, v.target or "")
        policy = self.policy_of(v.method)
        if policy and self.policy_finetuned(v.method):  # the policy fine-tuned with the model, its knob
            inputs[f"policy_{policy}"], inputs["match"] = finetuned_policy_paths(ds, arch, seed,
                                                                                f"{v.method}-{v.target}")
        elif policy:
            inputs[f"policy_{policy}"] = policy_path(ds, arch, seed, policy)
        return inputs

    def job_conditions(self, wildcards: Any, conds: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The (corruption, severity) pairs one evaluate or rank job runs: its own (study.jobs_per:
        condition), or all of ``conds``."""
        if self.per_condition:
            if wildcards.corruption == "clean" and wildcards.severity != "0":
                raise ValueError(f"clean images have severity 0, not {wildcards.severity}")
            return [(wildcards.corruption, int(wildcards.severity))]
        return conds

    def _corrupted_manifests(self, wildcards: Any, conds: list[tuple[str, int]]) -> list[str]:
        return [corrupt_manifest(wildcards.ds, c, s) for c, s in self.job_conditions(wildcards, conds) if c != "clean"]

    def evaluate_inputs(self, wildcards: Any) -> dict[str, Any]:
        """A variant's inputs and the corrupted sets of the job's evaluated conditions."""
        return {**self.variant_inputs(wildcards), "images": self._corrupted_manifests(wildcards, self.conditions())}

    def rank_inputs(self, wildcards: Any) -> dict[str, Any]:
        """A variant's inputs, the corrupted sets of the job's ranked conditions, and the dense
        model (its width normalises every variant's effective rank alike)."""
        v = self.variant(wildcards.ds, wildcards.arch, wildcards.variant)
        return {**self._variant_inputs(v), "images": self._corrupted_manifests(wildcards, self.rank_conditions()),
                "reference": model_path(v.dataset, v.backbone, v.seed, "dense")}

    def indexed_variant_inputs(self, ds: str, variants: list[Variant]) -> dict[str, str]:
        """Inputs of a job running several variants: model<i>, match<i> and policy<i> (its
        method's policy, if any) of the i-th, the dataset manifest."""
        inputs = {"manifest": dataset_manifest(ds)}
        for i, v in enumerate(variants):
            for key, path in self._variant_inputs(v).items():
                if key in ("model", "match"):
                    inputs[f"{key}{i}"] = path
                elif key.startswith("policy"):
                    inputs[f"policy{i}"] = path
        return inputs

    def bench_inputs(self, wildcards: Any) -> dict[str, str]:
        """What timing every variant of a seed reads: each checkpoint and match file (as
        evaluate), the policies, a val image."""
        return self.indexed_variant_inputs(wildcards.ds, self.variants(wildcards.ds, wildcards.arch, wildcards.seed))

    def qualitative_inputs(self, wildcards: Any) -> dict[str, str]:
        """Every panel column's checkpoint, match file (and policy), the dataset, the image set."""
        columns = [v for _title, v in self.qualitative_variants(wildcards.ds, wildcards.arch)]
        inputs = self.indexed_variant_inputs(wildcards.ds, columns)
        q = self.qualitative
        if q["corruption"] is not None:
            inputs["images"] = corrupt_manifest(wildcards.ds, q["corruption"], q["severity"])
        return inputs
