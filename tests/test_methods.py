"""The method registry (segcompress.methods): the contract every method keeps, and plug-ins."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from segcompress import methods
from segcompress.flops import analytic_gmacs, count_gmacs
from tiny_segmenter import tiny_model, tiny_spec

torch.set_num_threads(1)

ALL = [m.name for m in methods.all_methods()]
MATCHED_TOKEN = [m.name for m in methods.all_methods() if m.matched and m.token]


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_spec([64, 64], 8, 4, embed_dim=64))


@pytest.fixture(scope="module")
def img():
    torch.manual_seed(3)
    base = torch.nn.functional.interpolate(torch.randn(2, 3, 4, 4), size=(64, 64), mode="nearest")
    return base + 0.2 * torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", ALL)
def test_settings_round_trip_and_refuse_unknown_keys(name):
    method = methods.get(name)
    assert method.family in methods.FAMILIES and method.label
    defaults = method.settings()
    assert method.parse_settings(defaults.to_dict()) == defaults
    with pytest.raises(ValueError, match=rf"methods\.{name}: unknown key\(s\) bogus"):
        method.parse_settings({"bogus": 1})
    booleans = [f.name for f in dataclasses.fields(method.settings) if f.type in ("bool", bool)]
    if booleans:
        with pytest.raises(ValueError, match=booleans[0]):
            method.parse_settings({booleans[0]: "yes"})


@pytest.mark.parametrize("name", MATCHED_TOKEN)
def test_closed_form_cost_is_the_traced_cost(model, img, name):
    """The matched knob's GFLOPs are the ones fvcore counts on the model with the method attached."""
    target = 0.8 * analytic_gmacs(model.spec)
    one = img[:1]
    match = methods.solve(name, model.spec, target, model=model, images=[one])
    methods.apply_method(model, name, match.knob)
    try:
        counted = count_gmacs(model, one)
    finally:
        methods.apply_method(model, "dense")
    assert counted == pytest.approx(match.achieved_gflops, rel=1e-9)
    cost = methods.method_cost(name, match.knob, model.spec, model, [one])
    assert cost.mean == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("name", MATCHED_TOKEN)
def test_no_reduction_is_the_dense_model(model, img, name):
    """Where a method's knob at the dense GFLOPs reduces nothing, its output is the dense output."""
    dense_g = analytic_gmacs(model.spec)
    match = methods.solve(name, model.spec, dense_g, model=model, images=[img])
    if match.achieved_gflops != pytest.approx(dense_g, rel=1e-12):
        pytest.skip(f"{name} always reduces (its least reduction: {match.achieved_gflops / dense_g:.3f} of dense)")
    with torch.no_grad():
        dense = model(img)
        methods.apply_method(model, name, match.knob)
        try:
            reduced = model(img)
        finally:
            methods.apply_method(model, "dense")
    torch.testing.assert_close(reduced, dense, atol=1e-5, rtol=1e-5)


def test_unknown_method_and_knob_keys_are_refused_by_name(model):
    with pytest.raises(ValueError, match="unknown method .tomee.; choose one of dense, nvit, depgraph, tome"):
        methods.get("tomee")
    with pytest.raises(ValueError, match="unknown tome knob key\\(s\\): ratio"):
        methods.apply_method(model, "tome", {"r": 2, "ratio": 0.5})
    with pytest.raises(ValueError, match="takes no knob"):
        methods.apply_method(model, "dense", {"r": 2})


PLUGIN = '''
from dataclasses import dataclass
from segcompress.methods import Method, Settings

@dataclass(frozen=True)
class S(Settings):
    strength: float = 1.0

METHOD = Method("myplug", "My plug-in", "token", settings=S)
'''


def test_plugins_join_the_registry_from_a_file(tmp_path: Path, monkeypatch):
    (tmp_path / "myplug.py").write_text(PLUGIN)
    monkeypatch.setenv(methods.PLUGINS_ENV, str(tmp_path / "myplug.py"))
    try:
        assert methods.get("myplug").label == "My plug-in"
        assert methods.names()[-1] == "myplug" and methods.labels()["myplug"] == "My plug-in"
        assert methods.get("myplug").parse_settings({"strength": 2}).strength == 2
        with pytest.raises(ValueError, match="strength' must be a number"):
            methods.get("myplug").parse_settings({"strength": "x"})
        (tmp_path / "broken.py").write_text("X = 1\n")
        monkeypatch.setenv(methods.PLUGINS_ENV, str(tmp_path / "broken.py"))
        with pytest.raises(ValueError, match="declares no METHOD"):
            methods.names()
        (tmp_path / "dup.py").write_text(PLUGIN.replace('"myplug"', '"tome"'))
        monkeypatch.setenv(methods.PLUGINS_ENV, str(tmp_path / "dup.py"))
        with pytest.raises(ValueError, match="'tome' is defined twice"):
            methods.names()
        monkeypatch.setenv(methods.PLUGINS_ENV, str(tmp_path / "missing.py"))
        with pytest.raises(ValueError, match="missing.py is not a file"):
            methods.names()
    finally:
        monkeypatch.delenv(methods.PLUGINS_ENV)
        methods.reload()
    assert "myplug" not in methods.names()
