"""`zoo.list_models()` covers every model config, and the README's model table agrees with it."""

from __future__ import annotations

import re

import zoo
from zoo.registry import measure_parameters

from .conftest import CONFIGS, REPO_ROOT

TABLE_ROW = re.compile(
    r"^\| `(?P<name>[\w.-]+)` \| (?P<task>[\w-]+) \| (?P<params>[\d.]+)M \| `configs/(?P<config>[^`]+)` \|"
)


def test_every_registered_model_builds_from_its_config_with_the_stored_parameter_count():
    models = zoo.list_models()
    assert len({m.name for m in models}) == len(models)
    for model in models:
        assert model.config_path.is_file()
        assert measure_parameters(model.config) == model.parameters, model.name
        assert model.parameters and model.parameters > 10_000, model


def test_every_model_config_is_registered():
    registered = {m.config for m in zoo.list_models()}
    configs = {
        str(p.relative_to(CONFIGS))
        for p in CONFIGS.rglob("*.yaml")
        # strategies and the compression recipe apply to a model config; a family's base.yaml is what its
        # variants extend, not a model of its own
        if p.parent.name not in {"strategy", "compression"} and p.name != "base.yaml"
    }
    assert configs <= registered, f"configs missing from zoo.registry.MODELS: {sorted(configs - registered)}"


def test_readme_model_table_matches_the_registry():
    rows = {}
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        match = TABLE_ROW.match(line)
        if match:
            rows[match["name"]] = match
    models = zoo.list_models()
    assert set(rows) == {m.name for m in models}
    for model in models:
        row = rows[model.name]
        assert row["task"] == model.task and row["config"] == model.config
        assert row["params"] == f"{model.parameters / 1e6:.2f}", f"{model.name}: README says {row['params']}M"
