"""A shared cluster: the API server's own Pod Security admission, the operator without Secret
access, the platform's pass-through policy, and schema-valid input that must not crash it."""

from __future__ import annotations

import pytest

from kubetune_dev.jobs import job_manifest
from tests.fixtures.control_plane import run_operator, wait_for

from .jobs import Jobs

pytestmark = pytest.mark.cluster
NO_S3: dict = {}  # (the operator below does not connect to spec.s3.endpoint)


@pytest.fixture(scope="module")
def operator(cluster, crd):
    with run_operator(
        cluster, {"KUBETUNE_PROGRESS_POLL_SECONDS": "2", "KUBETUNE_PREFLIGHT_S3_ENDPOINT": "false"}
    ) as op:
        yield op
    assert not op.tracebacks(), op.tracebacks()


@pytest.fixture
def jobs(kube_api, namespace, operator) -> Jobs:
    return Jobs(kube_api, namespace)


def restricted(jobs: Jobs) -> None:
    labels = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    jobs.core.patch_namespace(jobs.ns, {"metadata": {"labels": labels}})


def reason(jobs: Jobs, name: str, ctype: str) -> str | None:
    return (jobs.condition(name, ctype) or {}).get("reason")


def test_trainer_and_sizing_pods_are_admitted_under_restricted(jobs):
    restricted(jobs)
    jobs.create(job_manifest(name="ok", **NO_S3))
    wait_for(lambda: [p.metadata.name for p in jobs.pods("ok")] == ["ok-a0-w0"], what="trainer pod admitted")
    jobs.create(job_manifest(name="sized", resources={"gpus": 1}, **NO_S3))
    roles = lambda: [p.metadata.labels.get("kubetune.io/role") for p in jobs.pods("sized")]  # noqa: E731
    wait_for(lambda: "sizing" in roles(), what="sizing pod admitted")
    assert jobs.status("ok")["phase"] != "Failed"


def test_a_pod_security_refusal_fails_the_job_once_with_the_admission_message(jobs):
    restricted(jobs)
    # A pass-through annotation that asks for an unconfined AppArmor profile: refused by PodSecurity.
    pod = {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}
    jobs.create(job_manifest(name="apparmor", pod=pod, **NO_S3))
    wait_for(lambda: jobs.status("apparmor").get("phase") == "Failed", what="Failed")
    failed = jobs.condition("apparmor", "Failed")
    assert failed["reason"] == "PodSecurityViolation" and "violates PodSecurity" in failed["message"]
    assert "apparmor" in failed["message"].lower() and jobs.pods("apparmor") == []
    warnings = [e for e in jobs.events("apparmor") if e.reason == "PodSecurityViolation"]
    assert len(warnings) == 1


def test_policy_refuses_a_pass_through_field_naming_it(jobs):
    jobs.create(job_manifest(name="sa", pod={"serviceAccountName": "cluster-admin-ish"}, **NO_S3))
    wait_for(lambda: reason(jobs, "sa", "Ready") == "PolicyViolation", what="PolicyViolation")
    message = jobs.condition("sa", "Ready")["message"]
    assert message.startswith("spec.pod.serviceAccountName") and "podPolicy.allowedServiceAccounts" in message
    assert jobs.pods("sa") == []
    jobs.patch_spec("sa", {"pod": {"serviceAccountName": "default"}})
    wait_for(lambda: [p.metadata.name for p in jobs.pods("sa")] == ["sa-a0-w0"], what="pod once allowed")


def test_a_missing_secret_is_reported_by_the_kubelet_not_read_by_the_operator(jobs):
    """No Secret exists and the operator may not read Secrets: the pod is created; the kubelet's
    CreateContainerConfigError (played here) reaches the Running condition."""
    jobs.create(job_manifest(name="nosecret", **NO_S3))
    wait_for(lambda: jobs.pods("nosecret"), what="pod")
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}
    status = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "trainer",
                "image": "t",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": waiting},
            }
        ],
    }
    jobs.core.patch_namespaced_pod_status("nosecret-a0-w0", jobs.ns, {"status": status})
    wait_for(lambda: reason(jobs, "nosecret", "Running") == "ContainerConfigError", what="ContainerConfigError")
    assert 'secret "s3-creds" not found' in jobs.condition("nosecret", "Running")["message"]


@pytest.mark.parametrize("endpoint", ["http://h:abc", "http://h:99999", "http://[::1", "http://user:pw@h:9000"])
def test_odd_endpoints_become_a_condition_naming_the_field(jobs, endpoint):
    name = f"ep{abs(hash(endpoint)) % 10000}"
    jobs.create(job_manifest(name=name, s3={"endpoint": endpoint}))
    wait_for(lambda: jobs.status(name).get("phase") == "Failed", what="Failed")
    failed = jobs.condition(name, "Failed")
    assert "spec.s3.endpoint" in failed["message"] and "pw" not in failed["message"]
    assert jobs.pods(name) == []


def test_affinity_of_the_wrong_shape_is_a_condition_not_a_traceback(jobs):
    jobs.create(job_manifest(name="aff", pod={"affinity": {"nodeAffinity": "x"}}, **NO_S3))
    wait_for(lambda: jobs.status("aff").get("phase") == "Failed", what="Failed")
    message = jobs.condition("aff", "Failed")["message"]
    assert message.startswith("spec.pod.affinity:") and "nodeAffinity must be an object" in message
