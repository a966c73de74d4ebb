"""The platform's policy for spec.pod pass-through fields (chart value podPolicy)."""

from __future__ import annotations

import pytest

from kubetune_dev.jobs import job_manifest
from kubetune_operator import api
from kubetune_operator.policy import PodPolicy, image_repository, violation
from kubetune_operator.settings import Settings

DEFAULT_IMAGE = "localhost/kubetune-trainer:v9"


def spec(**pod) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate(job_manifest(name="j", pod=pod)["spec"])


def refused(pod: dict, policy: PodPolicy | None = None) -> str | None:
    found = violation(spec(**pod), policy or PodPolicy(), DEFAULT_IMAGE)
    if found is None:
        return None
    assert found[0] == "PolicyViolation"
    return found[1]


def test_defaults_let_the_examples_run():
    assert refused({}) is None
    assert refused({"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}}]}) is None
    assert refused({"priorityClassName": "batch", "tolerations": [{"key": "gpu", "operator": "Exists"}]}) is None
    assert refused({"nodeSelector": {"pool": "a"}, "serviceAccountName": "default"}) is None
    assert refused({"image": "localhost/kubetune-trainer:dev"}) is None  # the chart's repository, another tag


@pytest.mark.parametrize(
    ("pod", "field", "rule"),
    [
        ({"image": "evil.example/miner:1"}, "spec.pod.image", "podPolicy.allowedImagePrefixes"),
        ({"image": "localhost/kubetune-trainer-evil:1"}, "spec.pod.image", "podPolicy.allowedImagePrefixes"),
        ({"serviceAccountName": "admin"}, "spec.pod.serviceAccountName", "podPolicy.allowedServiceAccounts"),
        ({"priorityClassName": "system-node-critical"}, "spec.pod.priorityClassName", "allowedPriorityClasses"),
    ],
)
def test_defaults_refuse_naming_the_field_and_the_rule(pod, field, rule):
    message = refused(pod)
    assert message is not None and message.startswith(field) and rule in message


def test_a_platform_policy():
    policy = PodPolicy.model_validate(
        {
            "allowedImagePrefixes": ["registry.example.com/ml/"],
            "allowedServiceAccounts": ["trainer"],
            "allowedPriorityClasses": ["batch"],
            "allowEnvSecretRefs": False,
            "allowedTolerationKeys": ["nvidia.com/gpu"],
            "allowedNodeSelectorKeys": ["pool"],
        }
    )
    ok = {
        "image": "registry.example.com/ml/trainer:2",
        "serviceAccountName": "trainer",
        "priorityClassName": "batch",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        "nodeSelector": {"pool": "gpu"},
        "env": [{"name": "X", "value": "1"}],
    }
    assert refused(ok, policy) is None
    cases = {
        "spec.pod.image": {"image": "localhost/kubetune-trainer:v9"},
        "spec.pod.priorityClassName": {"priorityClassName": "high"},
        "spec.pod.env[0] (T)": {"env": [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "spec.pod.tolerations[0].key": {"tolerations": [{"operator": "Exists"}]},  # tolerates every taint
        "spec.pod.nodeSelector key": {"nodeSelector": {"kubernetes.io/hostname": "n1"}},
        "spec.pod.affinity.nodeAffinity key": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Exists"}]}]
                    }
                }
            }
        },
    }
    for field, pod in cases.items():
        message = refused({**ok, **pod}, policy)
        assert message is not None and message.startswith(field), (field, message)


def test_star_allows_any_image():
    assert refused({"image": "anything:1"}, PodPolicy(allowed_image_prefixes=["*"])) is None


def test_image_repository():
    assert image_repository("reg:5000/a/b:1") == "reg:5000/a/b"
    assert image_repository("b@sha256:00") == "b"


def test_the_policy_reaches_the_operator_as_json():
    s = Settings.from_env({"KUBETUNE_POD_POLICY": '{"allowedServiceAccounts": ["*"], "allowEnvSecretRefs": false}'})
    assert s.pod_policy.allowed_service_accounts == ["*"] and s.pod_policy.allow_env_secret_refs is False


def test_a_price_table_without_a_default_row_is_refused_at_startup():
    with pytest.raises(ValueError, match="cost.gpuPrices"):
        Settings.from_env({"KUBETUNE_GPU_PRICES": '{"NVIDIA-L4": {"on-demand": 1}}'})
