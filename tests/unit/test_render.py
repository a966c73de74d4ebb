"""Pure builders of the objects a FineTuneJob owns."""

from __future__ import annotations

from kubetune_contract.config import TrainerConfig
from kubetune_dev.jobs import job_manifest
from kubetune_operator import api, render
from kubetune_operator.settings import Settings


def job(**overrides):
    manifest = job_manifest(name="j", **overrides)
    manifest["metadata"].update(namespace="ns", uid="u-1")
    return manifest, api.FineTuneJobSpec.model_validate(manifest["spec"])


def node_terms(pod):
    return pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]


def test_config_map_round_trips_through_the_contract():
    j, spec = job()
    cm = render.config_map(j, spec)
    cfg = TrainerConfig.loads(cm["data"]["trainer-config.json"])
    assert cfg.job.name == "j" and cfg.job.uid == "u-1" and cfg.lora == spec.lora and cfg.training == spec.training
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_pvc_claims_are_mounted_where_the_trainer_looks_for_them():
    from kubetune_contract.uris import local_path_for_uri

    j, spec = job(baseModel={"uri": "pvc://models/llama/8b"}, dataset={"uri": "pvc://data/train.jsonl"})
    cfg = render.trainer_config(j, spec)
    assert local_path_for_uri(cfg.base_model.uri) == "/mnt/kubetune/pvc/models/llama/8b"
    assert local_path_for_uri(cfg.dataset.uri) == "/mnt/kubetune/pvc/data/train.jsonl"
    pod = render.worker_pod(j, spec, Settings(), 0, 0, "127.0.0.1")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"models", "data"}
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert {"/mnt/kubetune/pvc/models", "/mnt/kubetune/pvc/data"} <= mounts


def test_spot_policies_become_affinity_and_tolerations():
    settings = Settings()
    j, spec = job(capacity={"policy": "spot"})
    pod = render.worker_pod(j, spec, settings, 0, 0, "x")
    assert {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["spot"]} in node_terms(pod)[0][
        "matchExpressions"
    ]
    assert settings.spot_tolerations[0] in pod["spec"]["tolerations"]

    j, spec = job(capacity={"policy": "spot-preferred"})
    pod = render.worker_pod(j, spec, settings, 0, 0, "x")
    pref = pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert (
        pref[0]["weight"] == 100
        and "requiredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"]["nodeAffinity"]
    )

    # The fallback to on-demand keeps pods off spot nodes.
    j, spec = job(capacity={"policy": "spot", "fallbackToOnDemand": True})
    pod = render.worker_pod(j, spec, settings, 3, 0, "x", on_demand=True)
    assert node_terms(pod)[0]["matchExpressions"] == [
        {"key": "karpenter.sh/capacity-type", "operator": "NotIn", "values": ["spot"]}
    ]
    assert "tolerations" not in pod["spec"]


def test_user_affinity_terms_are_anded_with_ours():
    user = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]},
                ]
            }
        },
        "podAntiAffinity": {"x": 1},
    }
    j, spec = job(capacity={"policy": "on-demand"}, pod={"affinity": user})
    pod = render.worker_pod(j, spec, Settings(), 0, 0, "x")
    terms = node_terms(pod)
    assert len(terms) == 2 and all(len(t["matchExpressions"]) == 2 for t in terms)
    assert pod["spec"]["affinity"]["podAntiAffinity"] == {"x": 1}
    assert spec.pod.affinity == user  # the spec itself is not mutated


def test_gpu_resources_type_and_settings_names():
    settings = Settings(gpu_resource="amd.com/gpu", gpu_type_label="gpu.product")
    j, spec = job(resources={"gpus": 4, "gpuType": "MI300X", "cpu": "16", "memory": "128Gi", "workers": 2})
    pod = render.worker_pod(j, spec, settings, 0, 1, "10.0.0.7")
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"] == res["requests"] == {"cpu": "16", "memory": "128Gi", "amd.com/gpu": "4"}
    assert {"key": "gpu.product", "operator": "In", "values": ["MI300X"]} in node_terms(pod)[0]["matchExpressions"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("1", "2", "10.0.0.7")
    assert pod["metadata"]["name"] == "j-a0-w1" and pod["metadata"]["labels"]["kubetune.io/rank"] == "1"


def test_pass_through_fields_and_safe_defaults():
    j, spec = job(
        pod={
            "image": "my/trainer:1",
            "env": [{"name": "X", "value": "1"}],
            "nodeSelector": {"pool": "a"},
            "priorityClassName": "batch",
            "labels": {"team": "nlp", "kubetune.io/rank": "spoof"},
        }
    )
    pod = render.worker_pod(j, spec, Settings(), 0, 0, "x")
    c = pod["spec"]["containers"][0]
    assert c["image"] == "my/trainer:1" and {"name": "X", "value": "1"} in c["env"]
    assert pod["spec"]["nodeSelector"] == {"pool": "a"} and pod["spec"]["priorityClassName"] == "batch"
    assert pod["metadata"]["labels"]["team"] == "nlp" and pod["metadata"]["labels"]["kubetune.io/rank"] == "0"
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["terminationMessagePath"] == "/dev/termination-log"


def test_pods_meet_pod_security_restricted_with_a_read_only_root():
    """Every pod kubetune creates: non-root as the image's user, no privilege escalation, no
    capabilities, RuntimeDefault seccomp, read-only root; what the trainer writes is a volume."""
    from kubetune_contract import layout

    j, spec = job()
    for pod in (render.worker_pod(j, spec, Settings(), 0, 0, "127.0.0.1"), render.sizing_pod(j, spec, Settings(), "s")):
        psc = pod["spec"]["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == layout.TRAINER_UID == 10001
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        c = pod["spec"]["containers"][0]
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {layout.SCRATCH_DIR, "/tmp"} <= mounts
        writable_env = {e["name"]: e["value"] for e in c["env"] if "value" in e and e["value"].startswith("/")}
        for name in ("HF_HOME", "TMPDIR", "KUBETUNE_WORK_DIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
            assert writable_env[name].startswith(layout.SCRATCH_DIR), name
