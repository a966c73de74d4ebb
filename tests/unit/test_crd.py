"""One source of truth: the CRD, its chart copy and the Python models cannot drift apart."""

from __future__ import annotations

import yaml

from kubetune_operator import api, crdgen


def test_generated_files_are_up_to_date():
    assert crdgen.main(["--check"]) == 0, "run `python -m kubetune_operator.crdgen` and commit the result"


def _walk(schema, path=""):
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_schema_is_structural():
    spec_schema = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(spec_schema):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ({"$ref", "anyOf", "allOf", "oneOf", "nullable"} & node.keys()), path


def test_every_example_validates_against_the_models():
    for path in (crdgen.REPO / "manifests" / "examples").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        api.FineTuneJobSpec.model_validate(doc["spec"])


def test_every_status_field_the_operator_writes_is_declared():
    status = crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for key in (
        "phase",
        "conditions",
        "observedGeneration",
        "startTime",
        "completionTime",
        "progress",
        "preemptions",
        "restarts",
        "lastCheckpoint",
        "cost",
        "workers",
        "attempt",
        "onDemandFallback",
        "outputUri",
        "message",
    ):
        assert key in status, key
    assert {"progressPercentage", "estimatedRemainingSeconds", "resumedFromStep"} <= status["progress"][
        "properties"
    ].keys()
    assert {"type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"} <= status["conditions"][
        "items"
    ]["properties"].keys()


def test_no_date_column_for_a_future_time():
    cols = crdgen.crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in cols if c["type"] == "date"] == ["Age"]
