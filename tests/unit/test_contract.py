"""The operator↔trainer contract: one home, and the operator sets only what it defines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kubetune_contract import envvars, layout, uris
from kubetune_contract.config import TrainerConfig
from kubetune_dev.jobs import job_manifest
from kubetune_operator import api, render
from kubetune_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _job(**overrides):
    manifest = job_manifest(name="j", **overrides)
    manifest["metadata"].update(namespace="ns", uid="u-1")
    return manifest, api.FineTuneJobSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize("workers, secret", [(1, False), (2, True)])
def test_render_sets_only_contract_env_vars(workers: int, secret: bool) -> None:
    overrides = {"resources": {"workers": workers}}
    if secret:
        overrides["s3"] = {"endpoint": "http://10.0.0.1:9000", "credentialsSecret": {"name": "s3-creds"}}
    j, spec = _job(**overrides)
    for rank in range(workers):
        pod = render.worker_pod(j, spec, Settings(), 0, rank, "10.1.2.3", job_cost='{"attempt": 0}')
        names = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
        assert names, "the trainer container has no environment"
        assert names <= envvars.OPERATOR_SET, f"not contract constants: {sorted(names - envvars.OPERATOR_SET)}"
        assert envvars.JOB_COST in names
        if secret:
            assert {envvars.S3_ACCESS_KEY, envvars.S3_SECRET_KEY} <= names


def test_user_env_passes_through_after_the_contract_env() -> None:
    j, spec = _job(pod={"env": [{"name": "MY_FLAG", "value": "1"}]})
    env = render.worker_pod(j, spec, Settings(), 0, 0, "x")["spec"]["containers"][0]["env"]
    assert env[-1] == {"name": "MY_FLAG", "value": "1"}


def test_the_operator_never_imports_the_trainer() -> None:
    for path in (REPO / "operator").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            assert not any(m.split(".")[0] == "kubetune_trainer" for m in mods), f"{path}:{node.lineno}"


def test_job_prefixes_follow_one_rule() -> None:
    j, spec = _job(checkpoints={"uri": "s3://ckpt/base/"}, output={"uri": "s3://out/x"})
    cfg = TrainerConfig.loads(render.config_map(j, spec)["data"][layout.CONFIG_KEY])
    uid = j["metadata"]["uid"]  # the incarnation: a re-created job of the same name gets new prefixes
    assert cfg.checkpoint_prefix == f"s3://ckpt/base/ns/j/{uid}"
    assert cfg.output_prefix == f"s3://out/x/ns/j/{uid}"
    assert uris.job_prefix("s3://b/p", "ns", "j", uid) == cfg.checkpoint_prefix.replace("ckpt/base", "b/p")
    assert uris.job_prefix("s3://b/p", "ns", "j") == "s3://b/p/ns/j"


def test_schema_pattern_and_parser_agree_on_buckets() -> None:
    import re

    pattern = re.compile(uris.S3_URI_PATTERN)
    for good in ("s3://abc", "s3://my.bucket-1/a/b"):
        assert pattern.match(good) and uris.parse_s3_uri(good)
    for bad in ("s3://AB/x", "s3://a/x", "S3://abc/x", "gs://abc/x"):
        assert not pattern.match(bad)
        with pytest.raises(uris.S3UriError):
            uris.parse_s3_uri(bad, field="spec.output.uri")
