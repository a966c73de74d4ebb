"""Restarting the operator at any moment neither duplicates nor loses pods or counts."""

from __future__ import annotations

import time

import pytest

from kubetune_dev.jobs import job_manifest
from tests.fixtures.control_plane import run_operator, wait_for

from .jobs import Jobs
from .test_operator import evict, phase, pod_names, running_pod, s3_port, spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster


def test_preemption_while_the_operator_is_down_is_counted_once(cluster, crd, kube_api, namespace, spec, fake_nodes):
    jobs = Jobs(kube_api, namespace)
    jobs.secret()
    fake_nodes(spot=True)
    env = {"KUBETUNE_PROGRESS_POLL_SECONDS": "1"}
    with run_operator(cluster, env) as first:
        jobs.create(job_manifest(name="restart", **spec))
        running_pod(jobs, "restart")
        wait_for(lambda: phase(jobs, "restart") == "Running", what="Running")
    assert not first.tracebacks()

    evict(jobs, "restart-a0-w0")  # the spot reclaim happens while nobody watches
    wait_for(lambda: pod_names(jobs, "restart") == [], what="evicted pod gone")

    with run_operator(cluster, env) as second:
        running_pod(jobs, "restart", attempt=1)
        time.sleep(3)  # several sweeps
        assert pod_names(jobs, "restart") == ["restart-a1-w0"]
        assert jobs.status("restart")["preemptions"] == 1
    with run_operator(cluster, env) as third:  # and once more, with nothing to do
        time.sleep(3)
    assert not second.tracebacks() and not third.tracebacks()
    assert pod_names(jobs, "restart") == ["restart-a1-w0"]
    st = jobs.status("restart")
    assert st["preemptions"] == 1 and st["attempt"] == 1 and st["restarts"] == 0


def test_two_operators_at_once_do_not_duplicate_pods(cluster, crd, kube_api, namespace, spec, fake_nodes):
    """Not a supported deployment (one replica, Recreate), but an upgrade can overlap briefly."""
    jobs = Jobs(kube_api, namespace)
    jobs.secret()
    fake_nodes()
    env = {"KUBETUNE_PROGRESS_POLL_SECONDS": "1"}
    with run_operator(cluster, env), run_operator(cluster, env):
        for i in range(5):
            jobs.create(job_manifest(name=f"twin{i}", **spec))
        for i in range(5):
            running_pod(jobs, f"twin{i}")
        time.sleep(3)
        for i in range(5):
            assert pod_names(jobs, f"twin{i}") == [f"twin{i}-a0-w0"]
