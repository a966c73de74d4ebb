"""FineTuneJob manifests for the tests, the demo and bench/: the example of
manifests/examples/ with a fresh name and overrides merged into its spec."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import yaml

from kubetune_dev.versions import REPO


def example(name: str = "cpu-lora-tiny.yaml") -> dict[str, Any]:
    return yaml.safe_load((REPO / "manifests" / "examples" / name).read_text())


def job_manifest(name: str | None = None, **spec_overrides: Any) -> dict[str, Any]:
    """The demo example with a fresh name; overrides merge into spec (None deletes a key)."""
    job = example()
    job["metadata"] = {"name": name or f"job-{uuid.uuid4().hex[:6]}"}
    job["spec"]["s3"] = {"endpoint": "http://127.0.0.1:9", "credentialsSecret": {"name": "s3-creds"}}
    merge(job["spec"], spec_overrides)
    return job


def merge(into: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if value is None:
            into.pop(key, None)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into
