"""The chart's values as an API: one documented model (`chart_values`), a generated strict schema and
values.yaml, the operator's settings reached unchanged, and one version for package, chart and images.
The helm tests use the real `helm` binary (templating only: no cluster)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from kubetune_dev.versions import binary
from kubetune_operator import valuesgen
from kubetune_operator.chart_values import SETTINGS_PATHS, ChartValues
from kubetune_operator.settings import Settings

VERSION = valuesgen.project_version()


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        path = f"{prefix}{field.alias or name}"
        yield path, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{path}.")


def _get(values: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        values = values[key]
    return values


# ---- generated files -----------------------------------------------------------------------------
def test_generated_chart_files_are_up_to_date():
    stale = [
        str(p.relative_to(valuesgen.REPO))
        for p, text in valuesgen.outputs().items()
        if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"run `python -m kubetune_operator.crdgen` and commit: {stale}"


def test_every_value_has_a_description():
    undocumented = [path for path, field in _fields(ChartValues) if not (field.description or "").strip()]
    assert not undocumented


def test_values_yaml_is_the_models_defaults_with_every_key_commented():
    text = valuesgen.VALUES_PATH.read_text()
    assert yaml.safe_load(text) == ChartValues().model_dump(by_alias=True, mode="json")
    ChartValues.model_validate(yaml.safe_load(text))
    lines = text.splitlines()
    keys = [(i, line) for i, line in enumerate(lines) if re.match(r"^\s*[A-Za-z][\w-]*:", line)]
    assert len(keys) == len(list(_fields(ChartValues)))  # one line per key: none hidden in a flow map
    for i, line in keys:
        indent = line[: len(line) - len(line.lstrip())]
        assert lines[i - 1].startswith(f"{indent}# "), f"values.yaml line {i + 1} has no comment: {line}"


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[{key}]")


def test_schema_is_strict_documented_and_accepts_global():
    schema = valuesgen.values_schema()
    for path, node in _walk(schema):
        if "properties" in node:
            assert node["additionalProperties"] is False, path
        assert not ({"$ref", "anyOf", "$defs"} & node.keys()) and ("title" not in node or not path), path
    for path, _ in _fields(ChartValues):
        node = schema
        for key in path.split("."):
            node = node["properties"][key]
        assert node["description"], path
    props = schema["properties"]
    # limits come from Settings (progress_poll_seconds > 0, cpu_hour_price >= 0) and the chart (a containerPort)
    assert props["progressPollSeconds"]["exclusiveMinimum"] == 0
    assert props["cost"]["properties"]["cpuHourPrice"]["minimum"] == 0
    port = props["metrics"]["properties"]["port"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    assert schema["properties"]["global"]["type"] == "object"
    assert "additionalProperties" not in schema["properties"]["global"]  # any object


# ---- the operator's settings, through the Deployment's environment --------------------------------
def test_settings_values_mirror_the_settings_fields():
    chart = {path: field for path, field in _fields(ChartValues)}
    assert set(SETTINGS_PATHS) == set(Settings.model_fields) - {"health_port"}
    for name, path in SETTINGS_PATHS.items():
        if name in ("metrics_port", "gpu_prices"):  # chart-side text: a containerPort >= 1; {} = built-ins
            continue
        assert chart[path].description.startswith(Settings.model_fields[name].description), path


def test_settings_default_trainer_image_is_the_project_version():
    assert Settings().trainer_image.rsplit(":", 1)[1] == VERSION


def test_version_is_written_only_in_pyproject_and_generated_chart_yaml():
    """One version source: pyproject.toml (Chart.yaml's copy is generated and drift-tested)."""
    try:
        files = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard"],
            cwd=valuesgen.REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    allowed = {
        "pyproject.toml",
        "charts/kubetune/Chart.yaml",
        "hack/constraints.txt",
    }  # pip freeze names the editable install `kubetune==VERSION`
    literal = re.compile(rf"(?<![\d.]){re.escape(VERSION)}(?!\.?\d)")
    found = []
    for name in files:
        path = valuesgen.REPO / name
        if name in allowed or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}:{n}" for n, line in enumerate(text.splitlines(), 1) if literal.search(line)]
    assert not found, f"say `the chart's appVersion` or read pyproject.toml instead: {found}"


# ---- the real helm ---------------------------------------------------------------------------------
def helm_template(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(binary("helm")), "template", "kt", str(valuesgen.CHART), "-n", "kubetune-system", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def _container(rendered: str) -> dict[str, Any]:
    deployment = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _env(rendered: str) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(rendered)["env"] if e["name"].startswith("KUBETUNE_")}


def test_helm_accepts_global_and_rejects_unknown_keys():
    helm_template("--set", "global.imageRegistry=registry.example", "--set-json", 'global.labels={"team":"ml"}')
    lint = subprocess.run(
        [
            str(binary("helm")),
            "lint",
            str(valuesgen.CHART),
            "--strict",
            "--set",
            "global.imageRegistry=registry.example",
        ],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0 and "0 chart(s) failed" in lint.stdout, lint.stdout + lint.stderr
    unknown = {
        "nope=1": "nope",
        "operator.imagee.tag=x": "imagee",
        "cost.gpuPrices.L4.ondemand=1": "ondemand",
        "metrics.serviceMonitor.intervall=5s": "intervall",
    }
    for setting, key in unknown.items():
        bad = helm_template("--set", setting, check=False)
        assert bad.returncode != 0 and f"'{key}' not allowed" in bad.stderr, bad.stderr
    bad = helm_template("--set", "metrics.port=0", check=False)
    assert bad.returncode != 0 and "port" in bad.stderr


def test_chart_works_as_a_subchart_of_a_parent_with_globals(tmp_path: Path):
    parent = tmp_path / "platform"
    shutil.copytree(valuesgen.CHART, parent / "charts" / "kubetune")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - {name: kubetune, version: '*'}\n"
    )
    (parent / "values.yaml").write_text(
        "global: {imageRegistry: registry.example}\nkubetune: {crds: {enabled: false}}\n"
    )
    out = subprocess.run([str(binary("helm")), "template", "p", str(parent)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Deployment" in out.stdout and "CustomResourceDefinition" not in out.stdout


def test_image_tags_default_to_the_charts_app_version():
    default = helm_template().stdout
    assert _container(default)["image"] == f"localhost/kubetune-operator:{VERSION}"
    assert _env(default)["KUBETUNE_TRAINER_IMAGE"] == f"localhost/kubetune-trainer:{VERSION}"
    tagged = helm_template("--set", "operator.image.tag=dev").stdout
    assert _container(tagged)["image"] == "localhost/kubetune-operator:dev"
    for given, rendered in (
        ("reg.example/trainer:1.2", "reg.example/trainer:1.2"),
        ("reg.example:5000/trainer", f"reg.example:5000/trainer:{VERSION}"),
        ("reg.example/trainer@sha256:" + "0" * 64, "reg.example/trainer@sha256:" + "0" * 64),
    ):
        assert _env(helm_template("--set", f"trainer.image={given}").stdout)["KUBETUNE_TRAINER_IMAGE"] == rendered


def test_chart_defaults_give_the_operators_own_defaults():
    assert Settings.from_env(_env(helm_template().stdout)) == Settings()


def test_every_settings_value_reaches_the_operator():
    overrides: dict[str, Any] = {
        "operator.watchNamespace": "ml",
        "trainer.image": "reg.example/trainer:2",
        "trainer.pullPolicy": "Always",
        "placement.capacityTypeLabel": "eks.amazonaws.com/capacityType",
        "placement.spotValue": "SPOT",
        "placement.spotTolerations": [{"key": "spot", "operator": "Exists"}],
        "placement.gpuResource": "amd.com/gpu",
        "placement.gpuTypeLabel": "gpu.product",
        "cost.gpuPrices": {"default": {"on-demand": 2.0}, "NVIDIA-L4": {"on-demand": 0.7, "spot": 0.3}},
        "cost.cpuHourPrice": 0.05,
        "progressPollSeconds": 2.5,
        "preflightS3Endpoint": False,
        "podPolicy": {"allowedImagePrefixes": ["reg.example/"], "allowEnvSecretRefs": False},
        "metrics.port": 9090,
    }
    assert set(overrides) == set(SETTINGS_PATHS.values())
    args = [a for path, value in overrides.items() for a in ("--set-json", f"{path}={json.dumps(value)}")]
    settings = Settings.from_env(_env(helm_template(*args).stdout))
    for name, path in SETTINGS_PATHS.items():
        value = getattr(settings, name)
        if hasattr(value, "model_dump"):  # podPolicy: a model
            value = value.model_dump(by_alias=True, exclude_defaults=True)
        assert value == overrides[path], name


def test_network_policy_is_opt_in_and_admits_only_the_operator_and_monitoring():
    assert "NetworkPolicy" not in helm_template().stdout
    out = helm_template("--set", "networkPolicy.enabled=true", "--set-json", 'networkPolicy.namespaces=["ml","nlp"]')
    policies = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "NetworkPolicy"]
    assert [p["metadata"]["namespace"] for p in policies] == ["ml", "nlp"]
    metrics_rule = policies[0]["spec"]["ingress"][0]
    assert metrics_rule["ports"] == [{"port": 9400, "protocol": "TCP"}]
    sources = [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in metrics_rule["from"]]
    assert sources == ["kubetune-system", "monitoring"] and "podSelector" in metrics_rule["from"][0]
