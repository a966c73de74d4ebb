"""Pure builders for the objects a FineTuneJob owns: the trainer ConfigMap and worker pods.

Plain pods, not a batch/v1 Job: the operator must classify every pod ending (preemption vs.
failure), change placement between attempts (spot -> on-demand fallback) and start rank > 0
only once rank 0 has an address; a Job's pod template is immutable and its retry accounting
cannot tell a spot reclaim from a crash. See docs/design/operator.md.
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune_contract import envvars, layout
from kubetune_contract.config import JobRef, TrainerConfig
from kubetune_contract.uris import pvc_claim

from . import api
from .settings import Settings

LABEL_JOB_NAME = "kubetune.io/job-name"
LABEL_JOB_UID = "kubetune.io/job-uid"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_RANK = "kubetune.io/rank"
LABEL_ROLE = "kubetune.io/role"  # "sizing" on the sizing pod; absent on workers
SIZING_RESOURCES = {"cpu": "1", "memory": "2Gi"}  # tokenizer + a 20k-record sample; no GPU
SIZING_DEADLINE_SECONDS = 900  # the kubelet stops a sizing pod that runs longer (decide_sizing waits as long)
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/name": "kubetune-trainer"}
CONTAINER = "trainer"


def pod_name(job_name: str, attempt: int, rank: int) -> str:
    """Deterministic, so "get, else create" is idempotent across operator restarts."""
    return f"{job_name}-a{attempt}-w{rank}"


def config_map_name(job_name: str) -> str:
    return f"{job_name}-trainer-config"


def owner_reference(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def pvc_claims(spec: api.FineTuneJobSpec) -> list[str]:
    """Claims named by pvc:// URIs; each is mounted at layout.PVC_MOUNT_ROOT/<claim>, where the
    trainer looks for them (uris.local_path_for_uri)."""
    uris = [spec.base_model.uri, spec.dataset.uri, spec.dataset.validation_uri or ""]
    return sorted({c for c in map(pvc_claim, uris) if c})


def trainer_config(job: dict[str, Any], spec: api.FineTuneJobSpec) -> TrainerConfig:
    meta = job["metadata"]
    return TrainerConfig(
        job=JobRef(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
        base_model=spec.base_model,
        dataset=spec.dataset,
        method=spec.method,
        lora=spec.lora,
        training=spec.training,
        checkpoints=spec.checkpoints,
        output=spec.output,
        s3=spec.s3,
        gpus_per_worker=spec.resources.gpus,
        workers=spec.resources.workers,
    )


def config_map(job: dict[str, Any], spec: api.FineTuneJobSpec) -> dict[str, Any]:
    meta = job["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": {**MANAGED_BY, LABEL_JOB_NAME: meta["name"], LABEL_JOB_UID: meta["uid"]},
            "ownerReferences": [owner_reference(job)],
        },
        "data": {layout.CONFIG_KEY: trainer_config(job, spec).dumps()},
    }


def _placement(spec: api.FineTuneJobSpec, settings: Settings, on_demand: bool) -> tuple[list, list, list]:
    """(required match expressions, preferred terms, tolerations) for capacity policy and GPU type."""
    required: list[dict[str, Any]] = []
    preferred: list[dict[str, Any]] = []
    tolerations: list[dict[str, Any]] = []
    policy = "on-demand" if on_demand else spec.capacity.policy
    label = settings.capacity_type_label
    if policy == "spot":
        required.append({"key": label, "operator": "In", "values": [settings.spot_value]})
        tolerations += settings.spot_tolerations
    elif policy == "spot-preferred":
        preferred.append(
            {
                "weight": 100,
                "preference": {"matchExpressions": [{"key": label, "operator": "In", "values": [settings.spot_value]}]},
            }
        )
        tolerations += settings.spot_tolerations
    else:  # on-demand: anything that is not labelled spot (clusters without the label included)
        required.append({"key": label, "operator": "NotIn", "values": [settings.spot_value]})
    if spec.resources.gpu_type:
        required.append({"key": settings.gpu_type_label, "operator": "In", "values": [spec.resources.gpu_type]})
    if spec.resources.gpus:
        tolerations.append({"key": settings.gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    return required, preferred, tolerations


def _affinity(user: dict[str, Any] | None, required: list, preferred: list) -> dict[str, Any] | None:
    """AND our node requirements into every user term; keep the user's other affinities as given."""
    affinity = copy.deepcopy(user) if user else {}
    if required or preferred:
        node = affinity.setdefault("nodeAffinity", {})
        if required:
            req = node.setdefault("requiredDuringSchedulingIgnoredDuringExecution", {})
            terms = req.get("nodeSelectorTerms") or [{}]
            for term in terms:
                term["matchExpressions"] = list(term.get("matchExpressions", [])) + required
            req["nodeSelectorTerms"] = terms
        if preferred:
            node["preferredDuringSchedulingIgnoredDuringExecution"] = (
                list(node.get("preferredDuringSchedulingIgnoredDuringExecution", [])) + preferred
            )
    return affinity or None


# Model downloads, checkpoint staging and temp files go to the scratch volume (sized by
# resources.ephemeralStorage), not the container's writable layer.
SCRATCH_ENV: list[dict[str, Any]] = [
    {"name": envvars.HF_HOME, "value": layout.SCRATCH_HF_HOME},
    {"name": envvars.WORK_DIR, "value": layout.SCRATCH_WORK_DIR},
    {"name": envvars.TMPDIR, "value": layout.SCRATCH_DIR},
    {"name": envvars.XDG_CACHE_HOME, "value": layout.SCRATCH_CACHE},
    {"name": envvars.TRITON_CACHE_DIR, "value": f"{layout.SCRATCH_CACHE}/triton"},
    {"name": envvars.TRITON_HOME, "value": layout.SCRATCH_CACHE},
    {"name": envvars.CUDA_CACHE_PATH, "value": f"{layout.SCRATCH_CACHE}/nv"},
]
# Pod Security `restricted` (and a read-only root filesystem: every path written is a volume).
# The user and group are the trainer image's (Dockerfile.trainer); fsGroup makes the volumes theirs.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": layout.TRAINER_UID,
    "runAsGroup": layout.TRAINER_GID,
    "fsGroup": layout.TRAINER_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _credentials_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """The job's S3 credentials (from its Secret, never read by the operator) and the user's env."""
    env: list[dict[str, Any]] = []
    secret = spec.s3.credentials_secret
    if secret:
        for env_name, key in (
            (envvars.S3_ACCESS_KEY, secret.access_key_id_key),
            (envvars.S3_SECRET_KEY, secret.secret_access_key_key),
        ):
            env.append({"name": env_name, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    return env + list(spec.pod.env or [])


def _volumes(job_name: str, spec: api.FineTuneJobSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts): the trainer config, scratch, /dev/shm and the pvc:// claims (read-only)."""
    res = spec.resources
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(job_name)}},
        {"name": "scratch", "emptyDir": {"sizeLimit": res.ephemeral_storage} if res.ephemeral_storage else {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and DataLoader workers need a real /dev/shm
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": layout.CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True},
        {"name": "scratch", "mountPath": layout.SCRATCH_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": layout.TMP_DIR},
    ]
    for i, claim in enumerate(pvc_claims(spec)):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{layout.PVC_MOUNT_ROOT}/{claim}", "readOnly": True})
    return volumes, mounts


def worker_pod(
    job: dict[str, Any],
    spec: api.FineTuneJobSpec,
    settings: Settings,
    attempt: int,
    rank: int,
    master_addr: str,
    on_demand: bool = False,
    job_cost: str | None = None,
) -> dict[str, Any]:
    """One worker pod; `job_cost`: the earlier attempts' goodput and cost (JSON, KUBETUNE_JOB_COST)."""
    meta = job["metadata"]
    name = meta["name"]
    res = spec.resources
    pod_cfg = spec.pod
    limits: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    if res.ephemeral_storage:
        limits["ephemeral-storage"] = res.ephemeral_storage
    if res.gpus:
        limits[settings.gpu_resource] = str(res.gpus)

    env: list[dict[str, Any]] = [
        {"name": envvars.CONFIG, "value": layout.CONFIG_PATH},
        {"name": envvars.RANK, "value": str(rank)},
        {"name": envvars.WORLD_SIZE, "value": str(res.workers)},
        {"name": envvars.MASTER_ADDR, "value": master_addr},
        {"name": envvars.MASTER_PORT, "value": str(layout.RENDEZVOUS_PORT)},
        {"name": envvars.ATTEMPT, "value": str(attempt)},
        {"name": envvars.METRICS_PORT, "value": str(layout.METRICS_PORT)},
        {"name": envvars.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": envvars.POD_UID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": envvars.NODE_NAME, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        *SCRATCH_ENV,
    ]
    if job_cost is not None:
        env.append({"name": envvars.JOB_COST, "value": job_cost})
    env += _credentials_env(spec)
    volumes, mounts = _volumes(name, spec)

    required, preferred, tolerations = _placement(spec, settings, on_demand)
    labels = {
        **(pod_cfg.labels or {}),
        **MANAGED_BY,
        LABEL_JOB_NAME: name,
        LABEL_JOB_UID: meta["uid"],
        LABEL_ATTEMPT: str(attempt),
        LABEL_RANK: str(rank),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "terminationGracePeriodSeconds": pod_cfg.termination_grace_period_seconds,
        "containers": [
            {
                "name": CONTAINER,
                "image": pod_cfg.image or settings.trainer_image,
                "imagePullPolicy": pod_cfg.image_pull_policy or settings.trainer_image_pull_policy,
                "env": env,
                "ports": [{"name": "metrics", "containerPort": layout.METRICS_PORT}]
                + ([{"name": "rendezvous", "containerPort": layout.RENDEZVOUS_PORT}] if res.workers > 1 else []),
                "resources": {"requests": dict(limits), "limits": dict(limits)},
                "volumeMounts": mounts,
                "terminationMessagePath": layout.TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": copy.deepcopy(SECURITY_CONTEXT),
            }
        ],
        "volumes": volumes,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
    }
    _place(pod_spec, pod_cfg, tolerations, _affinity(pod_cfg.affinity, required, preferred))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, attempt, rank),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": dict(pod_cfg.annotations or {}),
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }


def _place(
    pod_spec: dict[str, Any],
    pod_cfg: api.PodOverrides,
    tolerations: list[dict[str, Any]],
    affinity: dict[str, Any] | None,
) -> None:
    """The user's placement and identity fields on a pod spec (worker or sizing pod): their node selector,
    their tolerations plus ours (no duplicates), the given affinity, priority class, service account."""
    if pod_cfg.node_selector:
        pod_spec["nodeSelector"] = dict(pod_cfg.node_selector)
    own = list(pod_cfg.tolerations or [])
    merged = own + [t for t in tolerations if t not in own]
    if merged:
        pod_spec["tolerations"] = merged
    if affinity:
        pod_spec["affinity"] = affinity
    if pod_cfg.priority_class_name:
        pod_spec["priorityClassName"] = pod_cfg.priority_class_name
    if pod_cfg.service_account_name:
        pod_spec["serviceAccountName"] = pod_cfg.service_account_name


def sizing_pod(job: dict[str, Any], spec: api.FineTuneJobSpec, settings: Settings, name: str) -> dict[str, Any]:
    """The sizing pod (`kubetune-train size`, kubetune_trainer.size): CPU only, no GPU requested
    and no GPU node required, with the job's credentials, service account, env and volumes; its
    termination message is a kubetune_contract.sizing.SizingRecord. Ends by itself (restartPolicy
    Never, activeDeadlineSeconds); the operator deletes it once read."""
    meta = job["metadata"]
    pod_cfg = spec.pod
    volumes, mounts = _volumes(meta["name"], spec)
    volumes = [v for v in volumes if v["name"] != "dshm"]
    mounts = [m for m in mounts if m["name"] != "dshm"]
    env = [{"name": envvars.CONFIG, "value": layout.CONFIG_PATH}, *SCRATCH_ENV, *_credentials_env(spec)]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "activeDeadlineSeconds": SIZING_DEADLINE_SECONDS,
        "terminationGracePeriodSeconds": 5,
        "containers": [
            {
                "name": CONTAINER,
                "image": pod_cfg.image or settings.trainer_image,
                "imagePullPolicy": pod_cfg.image_pull_policy or settings.trainer_image_pull_policy,
                "args": ["size"],
                "env": env,
                "resources": {"requests": dict(SIZING_RESOURCES), "limits": dict(SIZING_RESOURCES)},
                "volumeMounts": mounts,
                "terminationMessagePath": layout.TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": copy.deepcopy(SECURITY_CONTEXT),
            }
        ],
        "volumes": volumes,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
    }
    # Wherever the user's placement allows (spot nodes too); never the GPU type or capacity policy.
    _place(pod_spec, pod_cfg, settings.spot_tolerations, copy.deepcopy(pod_cfg.affinity) if pod_cfg.affinity else None)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
                **(pod_cfg.labels or {}),
                **MANAGED_BY,
                LABEL_JOB_NAME: meta["name"],
                LABEL_JOB_UID: meta["uid"],
                LABEL_ROLE: "sizing",
            },
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
