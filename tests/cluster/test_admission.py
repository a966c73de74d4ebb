"""Specs that break the schema are refused by the real API server, naming the field."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.rest import ApiException

from kubetune_dev.jobs import job_manifest
from kubetune_operator.api import GROUP, PLURAL, VERSION

from .jobs import Jobs

pytestmark = pytest.mark.cluster

# (spec overrides, text the API server's message must contain)
MALFORMED = [
    ({"baseModel": None}, "spec.baseModel: Required value"),
    ({"method": "sft"}, 'spec.method: Unsupported value: "sft"'),
    ({"method": "qlora"}, "method qlora needs resources.gpus > 0"),
    ({"training": {"maxSteps": None}}, "set training.maxSteps or training.epochs"),
    ({"lora": {"r": 0}}, "spec.lora.r: Invalid value: 0: spec.lora.r in body should be greater than or equal to 1"),
    ({"checkpoints": {"uri": "http://bucket/prefix"}}, "spec.checkpoints.uri: Invalid value"),
    ({"resources": {"gpuType": "NVIDIA-A100-SXM4-80GB"}}, "resources.gpuType needs resources.gpus > 0"),
    ({"capacity": {"policy": "cheap"}}, 'spec.capacity.policy: Unsupported value: "cheap"'),
    ({"dataset": {"validationSplit": 0.9}}, "spec.dataset.validationSplit: Invalid value"),
    ({"training": {"deepspeed": "zero3"}}, "training.deepspeed needs resources.gpus > 0"),
    (
        {"method": "qlora", "resources": {"gpus": 1}, "training": {"deepspeed": "zero3-offload"}},
        "method qlora cannot use training.deepspeed zero3/zero3-offload",
    ),
    ({"training": {"precision": "fp16"}}, "training.precision fp16 needs resources.gpus > 0"),
    ({"training": {"evalSteps": 10}, "dataset": {"validationSplit": 0.0}}, "training.evalSteps needs validation data"),
    ({"resources": {"cpu": "lots"}}, "spec.resources.cpu: Invalid value"),
    ({"s3": {"endpoint": "minio:9000"}}, "spec.s3.endpoint: Invalid value"),
    (
        {"capacity": {"policy": "on-demand", "fallbackToOnDemand": True}},
        "fallbackToOnDemand only applies to spot policies",
    ),
    ({"training": {"learningRate": 0}}, "spec.training.learningRate: Invalid value"),
    ({"training": {"maxSteps": "ten"}}, "spec.training.maxSteps: Invalid value"),
    ({"resources": {"workers": 0}}, "spec.resources.workers: Invalid value"),
    ({"lora": {"targetModules": []}}, "spec.lora.targetModules: Invalid value"),
    ({"pod": {"terminationGracePeriodSeconds": 1}}, "spec.pod.terminationGracePeriodSeconds: Invalid value"),
    (
        {"budget": {"maxUsd": 0}},
        "spec.budget.maxUsd: Invalid value: 0: spec.budget.maxUsd in body should be greater than 0",
    ),
    ({"budget": {"maxGpuHours": -1}}, "spec.budget.maxGpuHours: Invalid value"),
]


@pytest.mark.parametrize("overrides,expected", MALFORMED, ids=[m[1][:48] for m in MALFORMED])
def test_malformed_spec_is_rejected_naming_the_field(kube_api, crd, namespace, overrides, expected):
    jobs = Jobs(kube_api, namespace)
    with pytest.raises(ApiException) as err:
        jobs.create(job_manifest(**overrides))
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    assert expected in message, message


def test_combinations_that_can_work_are_admitted(kube_api, crd, namespace):
    jobs = Jobs(kube_api, namespace)
    for overrides in (
        {"method": "qlora", "resources": {"gpus": 2}, "training": {"deepspeed": "zero2"}},
        {"method": "lora", "resources": {"gpus": 8}, "training": {"deepspeed": "zero3"}},
        {"training": {"evalSteps": 10}, "dataset": {"validationSplit": 0.1}},
        {"training": {"evalSteps": 10}, "dataset": {"validationUri": "s3://bucket/val.jsonl"}},
        {"resources": {"gpus": 1}, "training": {"precision": "fp16"}},
    ):
        jobs.create(job_manifest(**overrides))


def test_unknown_field_is_rejected_with_strict_validation(kube_api, crd, namespace):
    job = job_manifest()
    job["spec"]["trainnig"] = {"maxSteps": 5}  # a typo must not be silently dropped
    with pytest.raises(ApiException) as err:
        kube_api.call_api(
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}",
            "POST",
            query_params=[("fieldValidation", "Strict")],
            body=job,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            auth_settings=["BearerToken"],
            response_type="object",
            _return_http_data_only=True,
        )
    assert err.value.status == 400
    assert 'unknown field "spec.trainnig"' in json.loads(err.value.body)["message"]


def test_valid_spec_is_defaulted_by_the_api_server(kube_api, crd, namespace):
    jobs = Jobs(kube_api, namespace)
    job = job_manifest(lora=None, capacity=None, runPolicy=None)
    created = jobs.create(job)
    spec = created["spec"]
    assert spec["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]}
    assert spec["capacity"] == {"policy": "spot-preferred", "maxPreemptions": 10, "fallbackToOnDemand": False}
    assert spec["runPolicy"]["backoffLimit"] == 3 and spec["runPolicy"]["suspend"] is False
    assert spec["training"]["lrScheduler"] == "cosine"


def test_printer_columns(cluster, crd, namespace, kube_api):
    import subprocess

    from kubetune_dev.versions import binary

    Jobs(kube_api, namespace).create(job_manifest(name="printed"))
    out = subprocess.run(
        [str(binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "get", "ftj"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header = out.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "MODEL", "METHOD", "PROGRESS", "PREEMPTIONS", "COST", "AGE"]
    assert "printed" in out and "s3://kubetune-demo/models/tiny-llama" in out and "lora" in out
