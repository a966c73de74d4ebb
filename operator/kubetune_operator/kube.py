"""The operator's few Kubernetes calls, each idempotent ("get, else create"; 404 on delete is fine)."""
from __future__ import annotations

import json
import logging
import socket
import urllib.request
from typing import Any
from urllib.parse import urlparse

import kubernetes
from kubernetes.client.rest import ApiException

from . import api

log = logging.getLogger("kubetune.kube")


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        if client is None:
            config = kubernetes.client.Configuration.get_default_copy()
            config.connection_pool_maxsize = 32  # as many as reconcile threads
            client = kubernetes.client.ApiClient(config)
        self.client = client
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    # -- FineTuneJob ------------------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_status(self, job: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status, conditional on the resourceVersion we decided from (409 = re-decide)."""
        body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": status}
        return self.custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, job["metadata"]["namespace"], api.PLURAL, job["metadata"]["name"], body
        )

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, body={"propagationPolicy": "Background"}
            )
        except ApiException as e:
            if e.status != 404:
                raise

    # -- children ---------------------------------------------------------------------------
    def ensure_config_map(self, cm: dict[str, Any]) -> None:
        ns, name = cm["metadata"]["namespace"], cm["metadata"]["name"]
        try:
            self.core.create_namespaced_config_map(ns, cm)
        except ApiException as e:
            if e.status != 409:
                raise
            current = self.core.read_namespaced_config_map(name, ns)
            if (current.data or {}) != cm["data"]:  # spec changed since the last attempt
                self.core.patch_namespaced_config_map(name, ns, {"data": cm["data"]})

    def create_pod(self, pod: dict[str, Any]) -> bool:
        """True if created, False if it already existed."""
        try:
            self.core.create_namespaced_pod(pod["metadata"]["namespace"], pod)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.client.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise

    def secret_problem(self, namespace: str, ref: Any) -> tuple[str, str] | None:
        """(reason, message) when the credentials Secret or one of its keys is missing."""
        try:
            secret = self.core.read_namespaced_secret(ref.name, namespace)
        except ApiException as e:
            if e.status == 404:
                return ("SecretNotFound", f"Secret {ref.name!r} (spec.s3.credentialsSecret.name) not found in namespace "
                        f"{namespace!r}; create it with keys {ref.access_key_id_key} and {ref.secret_access_key_key}")
            if e.status == 403:
                return None  # not allowed to look: the kubelet will report it if it is really missing
            raise
        keys = set((secret.data or {}) | (secret.string_data or {}))
        missing = [k for k in (ref.access_key_id_key, ref.secret_access_key_key) if k not in keys]
        if missing:
            return ("SecretKeyMissing", f"Secret {ref.name!r} has no key(s) {', '.join(missing)} "
                    f"(spec.s3.credentialsSecret); it has: {', '.join(sorted(keys)) or 'none'}")
        return None


def s3_endpoint_problem(endpoint: str | None, timeout: float = 2.0) -> tuple[str, str] | None:
    """A TCP connect to the S3 endpoint: unreachable endpoints fail here, not after a pod starts."""
    if not endpoint:
        return None
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError as e:
        return ("S3EndpointUnreachable", f"cannot reach spec.s3.endpoint {endpoint} ({e.__class__.__name__}: {e}); "
                "check the URL, the Service/DNS name and network policies")


def fetch_progress(ip: str, port: int, timeout: float = 2.0) -> dict[str, Any] | None:
    """GET the trainer's /progress; None when it cannot be reached (starting, or we are off-cluster)."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/progress", timeout=timeout) as r:
            return json.loads(r.read())
    except (OSError, ValueError) as e:
        log.debug("progress from %s unavailable: %s", ip, e)
        return None
