"""The study's grid from its config: variants with their identity, conditions, training budgets,
and the files each stage must produce.

A :class:`Variant` is one evaluated model: (dataset, backbone, method, target, seed). Its name
(``tome-0.5-seed0``) is a file name: the plan looks a variant up among the variants it planned
(:meth:`Study.variant`); only a file outside the config's grid, asked for by its path, gets its
identity from its name (:meth:`Variant.from_name`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from segcompress import methods as registry
from segcompress.corrupt import CATEGORY_OF
from segcompress.plan.paths import (
    bench_row_path, corrupt_manifest, dataset_manifest, dense_flops_path, fraction_text, match_path, model_path,
    policy_path, qualitative_path, rank_row_path, row_path,
)

#: The dense model trained for the compressed variants' budget (finetune.dense_control): a
#: reference beside the dense model, not a compression method.
DENSE_CONTROL = registry.DENSE_CONTROL
REFERENCES: tuple[str, ...] = ("dense", DENSE_CONTROL)


@dataclass(frozen=True)
class Variant:
    """One evaluated model of the study.

    Args:
        dataset, backbone, seed: the dense model it derives from.
        method: a registry name, or ``dense_control``.
        target: the FLOPs fraction as it appears in paths (``None`` for the references).
    """

    dataset: str
    backbone: str
    method: str
    target: str | None
    seed: str

    @property
    def name(self) -> str:
        if self.target is None:
            return f"{self.method}-seed{self.seed}"
        return f"{self.method}-{self.target}-seed{self.seed}"

    @classmethod
    def from_name(cls, ds: str, arch: str, name: str) -> "Variant":
        """The variant a file name stands for (``<method>[-<target>]-seed<seed>``, as the
        workflow's wildcard constraint admits it), for a file outside the planned grid."""
        stem, seed = name.rsplit("-seed", 1)
        if stem in REFERENCES:
            return cls(ds, arch, stem, None, seed)
        method, target = stem.rsplit("-", 1)
        registry.get(method)
        return cls(ds, arch, method, target, seed)

    @property
    def reference(self) -> bool:
        return self.method in REFERENCES

    @property
    def applied(self) -> str:
        """The method its checkpoint is evaluated with (a pruned model runs as it is: dense)."""
        return "dense" if self.reference else registry.get(self.method).applied


class Study:
    """The grid of a validated config (``Snakefile``'s ``config``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.study = config["study"]
        self.finetune = config["finetune"]
        self.rank = config["analysis"]["effective_rank"]
        self.throughput = config["analysis"]["throughput"]
        self.qualitative = config["report"]["qualitative"]
        self.per_condition = self.study["jobs_per"] == "condition"
        self.dense_checkpoints: dict[str, dict[str, str]] = config["train"].get("dense_checkpoints") or {}

    # ---------------------------------------------------------------------------- settings

    def method_settings(self, name: str) -> Any:
        """``methods.<name>`` as the method's settings dataclass (its defaults filled in)."""
        return registry.get(name).parse_settings(self.config["methods"].get(name))

    def settings(self, name: str) -> dict[str, Any]:
        """:meth:`method_settings` as plain data (what ``segcompress match --settings`` gets)."""
        return self.method_settings(name).to_dict()

    def policy_of(self, method: str) -> str | None:
        """The method whose policy (``segcompress policy``) a variant of ``method`` reads: itself,
        or the method it is evaluated with; ``None``: none."""
        if method in REFERENCES:
            return None
        m = registry.get(method)
        return next((n for n in (m.name, m.applied) if registry.get(n).needs_policy), None)

    def policy_finetuned(self, method: str) -> bool:
        """Whether a variant of ``method`` is fine-tuned with a method whose policy trains with the
        model (finetune.token_methods and DToP's heads): its policy and knob come from fine-tuning."""
        if method in REFERENCES or not self.finetune["token_methods"]:
            return False
        return registry.get(registry.get(method).applied).policy_trains

    def policy_methods(self) -> list[str]:
        """The methods whose policies the study trains (once per dense model)."""
        return list(dict.fromkeys(p for p in map(self.policy_of, self.study["methods"]) if p is not None))

    def prune_fraction(self, hybrid: str, target: float | str) -> str:
        """Pruning target of a hybrid (prune-then-merge) at FLOPs ``target``: its settings'
        ``prune_fraction`` (target**prune_share of dense)."""
        return fraction_text(self.method_settings(hybrid).prune_fraction(float(target)))

    def hybrid_fractions(self, pruner: str) -> set[str]:
        """The pruning targets the study's hybrids need from ``pruner``."""
        return {self.prune_fraction(m, t) for m, t in self.compressed(registry.names(family="hybrid"))
                if registry.get(m).pruner == pruner}

    # -------------------------------------------------------------------------------- grid

    def grid(self) -> Iterator[tuple[str, str, str]]:
        """(dataset, backbone, seed) of every dense model."""
        for ds in self.study["datasets"]:
            for arch in self.study["backbones"]:
                for seed in self.study["seeds"]:
                    yield ds, arch, str(seed)

    def compressed(self, names: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
        """(method, target) pairs of the study for the given methods, targets as in paths."""
        return [(m, fraction_text(t)) for m in self.study["methods"] if m in names for t in self.study["targets"]]

    def variants(self, ds: str, arch: str, seed: str | int) -> list[Variant]:
        """The variants of one dense model: dense, the dense control, every method at every target."""
        seed = str(seed)
        out = [Variant(ds, arch, "dense", None, seed)] if "dense" in self.study["methods"] else []
        if self.finetune["dense_control"]:
            out.append(Variant(ds, arch, DENSE_CONTROL, None, seed))
        compressed = [m for m in self.study["methods"] if m != "dense"]
        return out + [Variant(ds, arch, m, t, seed) for m, t in self.compressed(compressed)]

    def variant(self, ds: str, arch: str, name: str) -> Variant:
        """The planned variant called ``name`` of (``ds``, ``arch``); a file outside the grid,
        requested by its path, is the variant its name stands for."""
        for _ds, _arch, seed in self.grid():
            if (_ds, _arch) == (ds, arch):
                for v in self.variants(ds, arch, seed):
                    if v.name == name:
                        return v
        return Variant.from_name(ds, arch, name)

    def severities_of(self, corruption: str) -> list[int]:
        """Severities of ``corruption``: its category's study.category_severities entry, else study.severities."""
        by_category = self.study.get("category_severities") or {}
        return by_category.get(CATEGORY_OF[corruption], self.study["severities"])

    def conditions(self) -> list[tuple[str, int]]:
        """(corruption, severity) pairs evaluated for every variant; clean first."""
        return [("clean", 0)] + [(c, s) for c in self.study["corruptions"] for s in self.severities_of(c)]

    def rank_datasets(self) -> list[str]:
        """Study datasets the effective rank is taken on: analysis.effective_rank.datasets (null:
        all) that the study has; others are skipped, so one setting fits every study."""
        names = self.rank["datasets"]
        return list(self.study["datasets"]) if names is None else [d for d in self.study["datasets"] if d in names]

    def rank_conditions(self) -> list[tuple[str, int]]:
        """(corruption, severity) pairs ranked: clean, then the configured corruptions and
        severities among the evaluated ones (a rank row joins the evaluated row of its condition)."""
        wanted, severities = self.rank["corruptions"], self.rank["severities"]
        out: list[tuple[str, int]] = [("clean", 0)]
        for c in self.study["corruptions"]:
            if wanted is None or c in wanted:
                out += [(c, s) for s in self.severities_of(c) if severities is None or s in severities]
        return out

    def qualitative_variants(self, ds: str, arch: str) -> list[tuple[str, Variant]]:
        """(column title, variant) of a panel: dense and every method at its most aggressive
        target, first seed."""
        seed, low = str(self.study["seeds"][0]), fraction_text(min(self.study["targets"]))
        return [(m if m == "dense" else f"{m} {low}", Variant(ds, arch, m, None if m == "dense" else low, seed))
                for m in self.study["methods"]]

    # ------------------------------------------------- post-compression training budget
    # Every variant trained after compression gets the same number of training iterations on top
    # of the dense model: NViT trains while it prunes (methods.nvit steps x interval) and is then
    # fine-tuned for finetune.recipe.iters; the dense control, every fine-tuned token method and
    # every structural method that prunes without training (DepGraph) get those two numbers
    # together, in one fine-tuning run with the same recipe and distillation. Prune-then-merge
    # fine-tunes its raw pruned model with ToMe attached (finetune.token_methods) or merges the
    # fine-tuned pruned model off the shelf: the same total either way.

    def pruning_iters(self) -> int:
        """Training iterations of one NViT pruning run, the budget's first part (0 when the study
        prunes nothing)."""
        if not self.compressed(registry.names(pruned=True)):
            return 0
        return self.iters_while_pruning("nvit")

    def iters_while_pruning(self, method: str) -> int:
        """Training iterations a model of ``method`` has had by the time it is pruned: its
        pruner's (a structural method's ``pruning_iters``; prune-then-merge: NViT's), else 0."""
        if method in REFERENCES or not registry.get(method).pruned:
            return 0
        pruner = method if registry.get(method).family == "structural" else registry.get(method).pruner
        assert pruner is not None
        return int(registry.get(pruner).code().pruning_iters(self.method_settings(pruner)))

    def pruners(self) -> list[str]:
        """The structural methods whose pruned models the study needs: its own, then its hybrids'
        (each writes its own pruned models)."""
        methods = [registry.get(m) for m in self.study["methods"]]
        return list(dict.fromkeys([*(m.name for m in methods if m.family == "structural"),
                                   *(m.pruner for m in methods if m.pruner is not None)]))

    def post_train_iters(self, method: str) -> int:
        """Training iterations a variant of ``method`` gets after the dense model (0: off the shelf)."""
        tuned, ft = self.finetune["recipe"]["iters"], self.finetune
        if method == "dense":
            return 0
        if method == DENSE_CONTROL:
            return self.pruning_iters() + tuned
        if registry.get(method).applied == "dense":  # a pruned model, evaluated as it is
            if not ft["pruned"]:
                return self.iters_while_pruning(method)
            return self.pruning_iters() + tuned
        if registry.get(method).pruned:  # a token method on a pruned model
            return self.pruning_iters() + (tuned if ft["pruned"] or ft["token_methods"] else 0)
        return self.pruning_iters() + tuned if ft["token_methods"] else 0

    def recipe_json(self, method: str) -> str:
        """finetune.recipe as JSON, its iterations topped up so that a model of ``method`` ends
        with its post-compression budget (a pruned model has already trained while pruning)."""
        iters = self.post_train_iters(method) - self.iters_while_pruning(method)
        if iters < 0:
            raise ValueError(f"{method} trains {self.iters_while_pruning(method)} iterations while pruning, more than "
                             f"the post-compression budget of {self.post_train_iters(method)}")
        recipe = {**self.finetune["recipe"], "iters": iters}
        return json.dumps(recipe, sort_keys=True, separators=(",", ":"))

    # ------------------------------------------------------------------------------ models

    def pruned_model(self, ds: str, arch: str, seed: str, fraction: str, pruner: str = "nvit") -> str:
        """The model ``pruner`` pruned to ``fraction`` as later stages use it (fine-tuned unless
        finetune.pruned is false)."""
        name = f"{pruner}-{fraction_text(fraction)}"
        return model_path(ds, arch, seed, f"{name}-ft" if self.finetune["pruned"] else name)

    def merge_base(self, ds: str, arch: str, seed: str, hybrid: str, target: str) -> str:
        """The pruned model a hybrid (prune-then-merge) attaches its token method to at
        ``target``: its pruner's raw pruned model when it is fine-tuned with the token method
        attached (finetune.token_methods), else the pruned model as the pruner's variants use it."""
        fraction, pruner = self.prune_fraction(hybrid, target), registry.get(hybrid).pruner
        assert pruner is not None
        if self.finetune["token_methods"]:
            return model_path(ds, arch, seed, f"{pruner}-{fraction}")
        return self.pruned_model(ds, arch, seed, fraction, pruner)

    def variant_model(self, v: Variant) -> str:
        """The checkpoint a variant is evaluated with."""
        ds, arch, seed = v.dataset, v.backbone, v.seed
        if v.method == "dense":
            return model_path(ds, arch, seed, "dense")
        if v.method == DENSE_CONTROL:
            return model_path(ds, arch, seed, "dense-ft")
        method = registry.get(v.method)
        assert v.target is not None
        if method.applied == "dense":
            return self.pruned_model(ds, arch, seed, v.target, pruner=v.method)
        if self.finetune["token_methods"]:
            return model_path(ds, arch, seed, f"{v.method}-{v.target}-ft")
        if method.pruned:
            return self.merge_base(ds, arch, seed, v.method, v.target)
        return model_path(ds, arch, seed, "dense")

    # ----------------------------------------------------------------- files per stage

    def data_targets(self) -> list[str]:
        return [dataset_manifest(ds) for ds in self.study["datasets"]]

    def corrupt_targets(self) -> list[str]:
        return [corrupt_manifest(ds, c, s) for ds in self.study["datasets"] for c, s in self.conditions()
                if c != "clean"]

    def train_targets(self) -> list[str]:
        return [path for ds, arch, seed in self.grid()
                for path in [model_path(ds, arch, seed, "dense"),
                             *(policy_path(ds, arch, seed, m) for m in self.policy_methods())]]

    def prune_fractions(self, pruner: str = "nvit") -> list[str]:
        """Every pruning target the study needs from ``pruner``: its own, and its hybrids' first
        step (prune-then-merge's)."""
        fractions = {t for _m, t in self.compressed((pruner,))} | self.hybrid_fractions(pruner)
        return sorted(fractions, key=float, reverse=True)

    def prune_targets(self) -> list[str]:
        return [model_path(ds, arch, seed, f"{p}-{f}") for ds, arch, seed in self.grid()
                for p in self.pruners() for f in self.prune_fractions(p)]

    def match_targets(self) -> list[str]:
        out = []
        for ds, arch, seed in self.grid():
            if "dense" in self.study["methods"]:
                out.append(dense_flops_path(ds, arch, seed))
            out += [match_path(ds, arch, seed, m, t) for m, t in self.compressed(registry.names(matched=True))]
        return out

    def finetune_targets(self) -> list[str]:
        ft, out = self.finetune, []
        for ds, arch, seed in self.grid():
            if ft["dense_control"]:
                out.append(model_path(ds, arch, seed, "dense-ft"))
            if ft["pruned"]:  # a hybrid fine-tunes its own pruned models with its token method attached
                for pruner in self.pruners():
                    fractions = [t for _m, t in self.compressed((pruner,))]
                    if not ft["token_methods"]:
                        fractions += sorted(self.hybrid_fractions(pruner))
                    out += [self.pruned_model(ds, arch, seed, f, pruner)
                            for f in sorted(set(fractions), key=float, reverse=True)]
            if ft["token_methods"]:
                out += [model_path(ds, arch, seed, f"{m}-{t}-ft") for m, t in self.compressed(registry.names(matched=True))]
        return out

    def evaluate_targets(self) -> list[str]:
        return [row_path(ds, arch, v.name, c, s) for ds, arch, seed in self.grid()
                for v in self.variants(ds, arch, seed) for c, s in self.conditions()]

    def rank_targets(self) -> list[str]:
        return [rank_row_path(ds, arch, v.name, c, s) for ds, arch, seed in self.grid() if ds in self.rank_datasets()
                for v in self.variants(ds, arch, seed) for c, s in self.rank_conditions()]

    def bench_targets(self) -> list[str]:
        if not self.throughput["enabled"]:
            return []
        return [bench_row_path(ds, arch, v.name) for ds, arch, seed in self.grid() for v in self.variants(ds, arch, seed)]

    def qualitative_targets(self) -> list[str]:
        if self.qualitative["images"] == 0:
            return []
        return [qualitative_path(ds, arch) for ds in self.study["datasets"] for arch in self.study["backbones"]]

    def analyse_targets(self) -> list[str]:
        return self.rank_targets() + self.bench_targets() + self.qualitative_targets()
