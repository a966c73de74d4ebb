"""The platform team's policy for the pass-through fields of spec.pod (chart value `podPolicy`).

Whoever may create a FineTuneJob gets pods created by the operator's ServiceAccount: without a
policy they could pick any image, ServiceAccount (and so cloud role), PriorityClass, node or
Secret of the namespace. `violation` is pure: the first field the policy refuses, as
(reason, message) naming the field and the chart value that refuses it; the job then waits with
Ready=False (reason PolicyViolation) until its spec or the policy changes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from . import api

REASON = "PolicyViolation"


class PodPolicy(BaseModel):
    """What spec.pod may set. A list holding "*" allows anything; an empty list allows nothing."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)

    allowed_image_prefixes: list[str] = Field(
        default_factory=list,
        description="spec.pod.image must start with one of these (e.g. registry.example.com/ml/); empty: only the "
        'trainer image\'s repository (trainer.image, any tag); "*": any image.',
    )
    allowed_service_accounts: list[str] = Field(
        default_factory=lambda: ["default"],
        description="ServiceAccounts spec.pod.serviceAccountName may name (cloud roles via workload identity come "
        'with them); "*": any.',
    )
    allowed_priority_classes: list[str] = Field(
        default_factory=lambda: ["*"],
        description='PriorityClasses spec.pod.priorityClassName may name; "*": any. system-* never.',
    )
    allow_env_secret_refs: bool = Field(
        True,
        description="Whether spec.pod.env may read Secrets of the job's namespace (valueFrom.secretKeyRef); the "
        "S3 credentials Secret (spec.s3.credentialsSecret) is always allowed.",
    )
    allowed_toleration_keys: list[str] = Field(
        default_factory=lambda: ["*"], description='Keys spec.pod.tolerations may tolerate; "*": any.'
    )
    allowed_node_selector_keys: list[str] = Field(
        default_factory=lambda: ["*"],
        description='Label keys spec.pod.nodeSelector (and spec.pod.affinity.nodeAffinity) may select on; "*": any.',
    )


def _chart(name: str) -> str:
    return f"podPolicy.{to_camel(name)}"


def _allows(allowed: list[str], value: Any) -> bool:
    return "*" in allowed or value in allowed


def _refused(field: str, value: Any, rule: str, allowed: list[str]) -> tuple[str, str]:
    listed = ", ".join(allowed) if allowed else "none"
    return REASON, f"{field} {value!r} is not allowed by the platform's policy ({_chart(rule)}: {listed})"


def _node_affinity_keys(affinity: dict[str, Any] | None) -> list[str]:
    node = (affinity or {}).get("nodeAffinity")
    if not isinstance(node, dict):
        return []
    terms: list[Any] = []
    req = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if isinstance(req, dict):
        terms += req.get("nodeSelectorTerms") or []
    terms += [p.get("preference") for p in node.get("preferredDuringSchedulingIgnoredDuringExecution") or [] if p]
    keys = []
    for term in terms:
        if isinstance(term, dict):
            for expr in (term.get("matchExpressions") or []) + (term.get("matchFields") or []):
                if isinstance(expr, dict) and "key" in expr:
                    keys.append(str(expr["key"]))
    return keys


def image_repository(image: str) -> str:
    """reg/ns/name of reg/ns/name:tag or @digest (a registry port is not a tag)."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def violation(spec: api.FineTuneJobSpec, policy: PodPolicy, default_image: str = "") -> tuple[str, str] | None:
    """The first spec.pod field `policy` refuses, or None."""
    pod = spec.pod
    if pod.image:
        prefixes = policy.allowed_image_prefixes
        if "*" not in prefixes:
            repo = image_repository(default_image) if default_image else ""
            allowed = prefixes or ([repo + ":", repo + "@"] if repo else [])
            if not (any(pod.image.startswith(p) for p in allowed) or (not prefixes and pod.image == repo)):
                return _refused("spec.pod.image", pod.image, "allowed_image_prefixes", allowed)
    sa = pod.service_account_name
    if sa and not _allows(policy.allowed_service_accounts, sa):
        return _refused("spec.pod.serviceAccountName", sa, "allowed_service_accounts", policy.allowed_service_accounts)
    pc = pod.priority_class_name
    if pc:
        allowed_pc = policy.allowed_priority_classes
        if pc.startswith("system-") or not _allows(allowed_pc, pc):
            return _refused("spec.pod.priorityClassName", pc, "allowed_priority_classes", allowed_pc)
    if not policy.allow_env_secret_refs:
        for i, env in enumerate(pod.env or []):
            value_from = env.get("valueFrom") if isinstance(env, dict) else None
            if isinstance(value_from, dict) and "secretKeyRef" in value_from:
                return (
                    REASON,
                    f"spec.pod.env[{i}] ({env.get('name')}) reads a Secret, which the platform's policy does not "
                    f"allow ({_chart('allow_env_secret_refs')}: false)",
                )
    keys = policy.allowed_toleration_keys
    if "*" not in keys:
        for i, tol in enumerate(pod.tolerations or []):
            key = tol.get("key") if isinstance(tol, dict) else None
            if key not in keys:  # a toleration without a key tolerates every taint
                return _refused(f"spec.pod.tolerations[{i}].key", key, "allowed_toleration_keys", keys)
    labels = policy.allowed_node_selector_keys
    if "*" not in labels:
        for key in list((pod.node_selector or {}).keys()):
            if key not in labels:
                return _refused("spec.pod.nodeSelector key", key, "allowed_node_selector_keys", labels)
        for key in _node_affinity_keys(pod.affinity):
            if key not in labels:
                return _refused("spec.pod.affinity.nodeAffinity key", key, "allowed_node_selector_keys", labels)
    return None
