"""The Helm chart, with the real `helm`, against the real API server; and the operator running
under the chart's own ServiceAccount, so a gap in its least-privilege RBAC fails a test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes
import pytest
import yaml

from kubetune_contract.progress import ProgressRecord
from kubetune_dev.jobs import job_manifest
from kubetune_dev.versions import binary, monitoring_crds
from kubetune_operator import crdgen
from tests.fixtures.control_plane import run_operator, wait_for

from .jobs import Jobs
from .test_operator import evict, finish_pod, phase, pod_names, running_pod, s3_port, spec  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster
CHART = crdgen.REPO / "charts" / "kubetune"


def helm(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(binary("helm")), *args]
    if kubeconfig:
        cmd += ["--kubeconfig", str(kubeconfig)]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def test_chart_lints_and_renders_the_generated_crd():
    assert "0 chart(s) failed" in helm("lint", str(CHART), "--strict").stdout
    docs = [d for d in yaml.safe_load_all(helm("template", "kt", str(CHART), "-n", "kubetune-system").stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    rendered = next(d for d in docs if d["kind"] == "CustomResourceDefinition")
    assert rendered["spec"] == crdgen.crd()["spec"]
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_values_schema_rejects_unknown_keys_and_bad_types():
    bad = helm("template", "kt", str(CHART), "--set", "operator.imagee.tag=x", check=False)
    assert bad.returncode != 0 and "imagee" in bad.stderr
    bad = helm("template", "kt", str(CHART), "--set", "progressPollSeconds=0", check=False)
    assert bad.returncode != 0 and "progressPollSeconds" in bad.stderr
    no_default = '{"NVIDIA-L4":{"on-demand":0.7,"spot":0.3}}'
    bad = helm("template", "kt", str(CHART), "--set-json", f"cost.gpuPrices={no_default}", check=False)
    assert bad.returncode != 0 and "gpuPrices" in bad.stderr and "default" in bad.stderr
    ok = helm(
        "template",
        "kt",
        str(CHART),
        "--set",
        "crds.enabled=false",
        "--set-json",
        'cost.gpuPrices={"default":{"on-demand":2},"NVIDIA-L4":{"on-demand":0.7,"spot":0.3}}',
    )
    env = {
        e["name"]: e.get("value")
        for d in yaml.safe_load_all(ok.stdout)
        if d and d["kind"] == "Deployment"
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert json.loads(env["KUBETUNE_GPU_PRICES"]) == {
        "default": {"on-demand": 2},
        "NVIDIA-L4": {"on-demand": 0.7, "spot": 0.3},
    }
    assert "CustomResourceDefinition" not in ok.stdout


@pytest.fixture(scope="module")
def chart_operator_kubeconfig(cluster, crd, kube_api, tmp_path_factory) -> Path:
    """`helm install` the chart (CRD already installed), then a kubeconfig that authenticates as
    the chart's ServiceAccount, with a token from the TokenRequest API."""
    core = kubernetes.client.CoreV1Api(kube_api)
    out = helm(
        "install",
        "kt",
        str(CHART),
        "-n",
        "kubetune-system",
        "--create-namespace",
        "--set",
        "crds.enabled=false",
        "--wait=false",
        kubeconfig=cluster.kubeconfig,
    )
    assert "STATUS: deployed" in out.stdout
    sa = "kt-operator"
    wait_for(lambda: core.read_namespaced_service_account(sa, "kubetune-system"), what="operator ServiceAccount")
    token = core.create_namespaced_service_account_token(
        sa, "kubetune-system", {"spec": {"expirationSeconds": 7200}}
    ).status.token
    admin = json.loads(Path(cluster.kubeconfig).read_text())
    admin["users"] = [{"name": sa, "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = sa
    path = tmp_path_factory.mktemp("sa") / "kubeconfig"
    path.write_text(json.dumps(admin))
    yield path
    helm("uninstall", "kt", "-n", "kubetune-system", kubeconfig=cluster.kubeconfig, check=False)


def test_operator_works_under_the_charts_rbac(
    cluster, kube_api, namespace, spec, fake_nodes, chart_operator_kubeconfig
):
    jobs = Jobs(kube_api, namespace)
    jobs.secret()
    fake_nodes(spot=True)
    with run_operator(
        cluster, {"KUBECONFIG": str(chart_operator_kubeconfig), "KUBETUNE_PROGRESS_POLL_SECONDS": "1"}
    ) as op:
        jobs.create(job_manifest(name="rbac", runPolicy={"ttlSecondsAfterFinished": 1}, **spec))
        running_pod(jobs, "rbac")
        evict(jobs, "rbac-a0-w0")
        running_pod(jobs, "rbac", attempt=1)
        finish_pod(jobs, "rbac-a1-w0", 0, ProgressRecord(phase="done", step=120, total_steps=120))
        # Status, events, ConfigMap, Secret check, pod create/delete and the TTL delete all passed RBAC.
        wait_for(
            lambda: (
                "rbac"
                not in [
                    j["metadata"]["name"]
                    for j in jobs.custom.list_namespaced_custom_object(
                        "kubetune.io", "v1alpha1", jobs.ns, "finetunejobs"
                    )["items"]
                ]
            ),
            timeout=30,
            what="job done and deleted by its TTL",
        )
        reasons = {e.reason for e in jobs.events("rbac")}
        assert {"PodsCreated", "Preempted"} <= reasons
    log = op.log_text()
    # RBAC denials name the identity ("User ... cannot ..."); other tests' namespaces being
    # deleted also answer 403, for Events, and are no RBAC gap.
    assert 'system:serviceaccount:kubetune-system:kt-operator" cannot' not in log, log[-3000:]
    assert not op.tracebacks()


# ---- opt-in monitoring, against the prometheus-operator's own CRDs ----------------------------------
MONITORING = [
    *("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"),
    *("--set", "metrics.prometheusRule.enabled=true"),
    *("--set-json", 'metrics.serviceMonitor.additionalLabels={"release":"kube-prometheus-stack"}'),
    *(
        "--set",
        "metrics.serviceMonitor.scrapeTimeout=10s",
        "--set",
        "metrics.prometheusRule.runbookUrl=https://x.example",
    ),
]
PLURALS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}


@pytest.fixture(scope="module")
def prometheus_operator_crds(kube_api):
    """The pinned prometheus-operator CRDs (hack/versions.env), installed for this module only."""
    ext = kubernetes.client.ApiextensionsV1Api(kube_api)
    names = []
    for path in monitoring_crds():
        manifest = yaml.safe_load(path.read_text())
        names.append(manifest["metadata"]["name"])
        ext.create_custom_resource_definition(manifest)

    def established() -> bool:
        conds = [ext.read_custom_resource_definition(n).status.conditions or [] for n in names]
        return all(any(c.type == "Established" and c.status == "True" for c in cs) for cs in conds)

    wait_for(established, what="monitoring.coreos.com CRDs established")
    yield names
    for name in names:
        ext.delete_custom_resource_definition(name)


def test_monitoring_objects_are_valid_for_the_prometheus_operator_crds(cluster, kube_api, prometheus_operator_crds):
    """Each rendered monitor and rule passes the real CRD schema with strict field validation (a
    misspelt field is an error, not silently pruned), and `helm install` with all of it on deploys."""
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    rendered = [
        d
        for d in yaml.safe_load_all(helm("template", "kt", str(CHART), "-n", "kubetune-system", *MONITORING).stdout)
        if d and d["apiVersion"] == "monitoring.coreos.com/v1"
    ]
    assert sorted(d["kind"] for d in rendered) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    core = kubernetes.client.CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": "kubetune-monitoring"}})
    try:
        for doc in rendered:
            created = custom.create_namespaced_custom_object(
                "monitoring.coreos.com",
                "v1",
                "kubetune-monitoring",
                PLURALS[doc["kind"]],
                {**doc, "metadata": {**doc["metadata"], "namespace": "kubetune-monitoring"}},
                dry_run="All",
                field_validation="Strict",
            )
            assert created["spec"] == doc["spec"], doc["kind"]  # nothing pruned, nothing defaulted away
        out = helm(
            "install",
            "kt-mon",
            str(CHART),
            "-n",
            "kubetune-monitoring",
            "--set",
            "crds.enabled=false",
            *MONITORING,
            "--wait=false",
            kubeconfig=cluster.kubeconfig,
        )
        assert "STATUS: deployed" in out.stdout
        for kind, plural in PLURALS.items():
            (item,) = custom.list_namespaced_custom_object(
                "monitoring.coreos.com", "v1", "kubetune-monitoring", plural
            )["items"]
            assert item["metadata"]["labels"]["app.kubernetes.io/instance"] == "kt-mon", kind
    finally:
        helm("uninstall", "kt-mon", "-n", "kubetune-monitoring", kubeconfig=cluster.kubeconfig, check=False)
        core.delete_namespace("kubetune-monitoring")
