"""spec.budget on a real API server: a GPU job on a (kwok) node runs until its accrued estimate
reaches spec.budget.maxUsd, is warned at 80%, then has its pod deleted (the trainer's SIGTERM
checkpoint) and is Suspended with BudgetExceeded; raising the budget starts the next attempt,
which resumes from the last checkpoint. A real Prometheus scraping the operator and loading the
chart's rules fires both budget alerts on the way.

The operator here prices a GPU at 3600 USD an hour (one dollar a second), so a 20 USD budget lasts
about 20 s of the pod's run and the 80% warning has a 4 s window: wider than the 2 s sweep."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_dev.alert_rules import write_rules_file
from kubetune_dev.jobs import job_manifest
from tests.fixtures.control_plane import run_operator, wait_for

from .jobs import Jobs
from .test_operator import phase, running_pod, s3_port  # noqa: F401  (s3_port: a fixture)

pytestmark = pytest.mark.cluster
USD_PER_GPU_SECOND = 1.0
MAX_USD = 20


@pytest.fixture(scope="module")
def operator(cluster, crd) -> Iterator[Any]:
    prices = {"default": {"on-demand": USD_PER_GPU_SECOND * 3600, "spot": USD_PER_GPU_SECOND * 3600}}
    env = {"KUBETUNE_PROGRESS_POLL_SECONDS": "2", "KUBETUNE_GPU_PRICES": json.dumps(prices)}
    with run_operator(cluster, env) as op:
        yield op
    assert not op.tracebacks(), op.tracebacks()


@pytest.fixture
def jobs(kube_api, namespace, operator) -> Jobs:
    j = Jobs(kube_api, namespace)
    j.secret()
    return j


def firing(prom, alert: str, name: str) -> list[dict[str, Any]]:
    return prom.query(f'ALERTS{{alertname="{alert}",finetunejob="{name}",alertstate="firing"}}')


def test_budget_suspends_a_running_job_and_raising_it_resumes(
    jobs, s3_port, fake_nodes, operator, prometheus, tmp_path
):  # noqa: F811
    rules = write_rules_file(tmp_path / "rules.yaml", operator_job="kubetune-operator")
    prom = prometheus({"kubetune-operator": [f"127.0.0.1:{operator.metrics_port}"]}, rule_files=[rules])
    prom.wait_for_targets()
    fake_nodes(gpus=8)
    name = "capped"
    sel = f'job_namespace="{jobs.ns}",finetunejob="{name}"'
    jobs.create(
        job_manifest(
            name=name,
            resources={"gpus": 1},
            preflight={"estimate": False},  # sized elsewhere (test_sizing)
            budget={"maxUsd": MAX_USD},
            s3={"endpoint": f"http://127.0.0.1:{s3_port}"},
        )
    )
    running_pod(jobs, name)
    started = time.monotonic()
    wait_for(lambda: phase(jobs, name) == "Running", what="job Running")

    # At the limit: the pod is deleted (its trainer checkpoints on SIGTERM), the job is Suspended.
    wait_for(lambda: phase(jobs, name) == "Suspended", timeout=MAX_USD + 30, what="Suspended at the budget")
    ran = time.monotonic() - started
    st = jobs.status(name)
    print(f"suspended after {ran:.1f}s; status: {st}")  # in the report of a failure
    exceeded = jobs.condition(name, "BudgetExceeded")
    assert exceeded and (exceeded["status"], exceeded["reason"]) == ("True", "BudgetExceeded")
    assert f"of spec.budget.maxUsd {MAX_USD}" in exceeded["message"]
    used = float(st["cost"]["estimatedUsd"])
    assert MAX_USD <= used <= MAX_USD + 5 * USD_PER_GPU_SECOND  # stopped within a sweep or two of the limit
    assert f"estimated USD {used:.4f}" in exceeded["message"]
    assert st["preemptions"] == 0 and st["restarts"] == 0 and st["attempt"] == 1
    assert st["budget"]["warnedFor"] == {"maxUsd": MAX_USD} and "workers" not in st
    wait_for(lambda: not jobs.pods(name), what="the worker pod deleted")

    def reasons() -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in jobs.events(name)]

    wait_for(lambda: ("Warning", "BudgetExceeded") in reasons(), what="the BudgetExceeded event")
    assert reasons().count(("Warning", "BudgetNearlyExceeded")) == 1

    # Stays stopped: no new attempt while the budget is spent.
    time.sleep(5)
    assert not jobs.pods(name) and phase(jobs, name) == "Suspended"
    assert float(jobs.status(name)["cost"]["estimatedUsd"]) == used  # nothing runs, nothing accrues

    # Prometheus saw the budget and fired both alerts.
    assert prom.value(f"kubetune_job_budget_usd{{{sel}}}") == MAX_USD
    wait_for(lambda: firing(prom, "KubetuneJobBudgetExceeded", name), timeout=30, what="the exceeded alert firing")
    (alert,) = firing(prom, "KubetuneJobBudgetExceeded", name)
    assert (alert["metric"]["budget"], alert["metric"]["namespace"]) == ("maxUsd", jobs.ns)
    nearly = f'ALERTS{{alertname="KubetuneJobBudgetNearlyExceeded",finetunejob="{name}",alertstate="firing"}}'
    assert prom.query(f"max_over_time({nearly}[5m])"), "the 80% alert fired before the job reached its budget"
    assert not prom.query(nearly)  # ... and made way for the exceeded one

    # Raised: the next attempt's pod is created and runs (resuming from the last checkpoint).
    jobs.patch_spec(name, {"budget": {"maxUsd": 10 * MAX_USD}})
    pod = running_pod(jobs, name, attempt=1)
    assert pod.metadata.labels["kubetune.io/attempt"] == "1"
    wait_for(lambda: phase(jobs, name) == "Running", what="Running again")
    assert jobs.condition(name, "BudgetExceeded")["status"] == "False"
    assert jobs.condition(name, "Suspended")["status"] == "False"
    assert ("Normal", "Resumed") in [(e.type, e.reason) for e in jobs.events(name)]
    wait_for(lambda: not firing(prom, "KubetuneJobBudgetExceeded", name), timeout=30, what="the alert resolved")
    assert prom.value(f"kubetune_job_budget_usd{{{sel}}}") == 10 * MAX_USD
