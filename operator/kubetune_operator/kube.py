"""The operator's few Kubernetes API calls, each idempotent ("get, else create"; 404 on delete is
fine). A thin client: observe.py makes the reads, act.py the writes; neither talks to the API
server any other way."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from prometheus_client import Counter

from . import api

API_REQUEST_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds for every call below: none may hang a pass


class _TimeoutApiClient(kubernetes.client.ApiClient):
    """An ApiClient whose requests time out unless a call sets its own _request_timeout."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            kwargs["_request_timeout"] = API_REQUEST_TIMEOUT
        return super().request(*args, **kwargs)


class Kube:
    """`requests`: a Counter labelled (verb, resource, result) that every call below increments."""

    def __init__(self, client: kubernetes.client.ApiClient | None = None, requests: Counter | None = None):
        if client is None:
            config = kubernetes.client.Configuration.get_default_copy()
            config.connection_pool_maxsize = 32  # as many as reconcile threads
            client = _TimeoutApiClient(config)
        self.client = client
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self._requests = requests

    @contextlib.contextmanager
    def _request(self, verb: str, resource: str) -> Iterator[None]:
        """Count one API request by its result: ok, the HTTP status code, or connection_error."""
        result = "ok"
        try:
            yield
        except ApiException as e:
            result = str(e.status) if e.status else "connection_error"
            raise
        except Exception:
            result = "connection_error"  # urllib3 errors: no response
            raise
        finally:
            if self._requests is not None:
                self._requests.labels(verb, resource, result).inc()

    # -- FineTuneJob ------------------------------------------------------------------------
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with self._request("get", api.PLURAL):
                return self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def patch_status(self, job: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status, conditional on the resourceVersion we decided from (409 = re-decide)."""
        body = {"metadata": {"resourceVersion": job["metadata"]["resourceVersion"]}, "status": status}
        with self._request("patch", f"{api.PLURAL}/status"):
            return self.custom.patch_namespaced_custom_object_status(
                api.GROUP, api.VERSION, job["metadata"]["namespace"], api.PLURAL, job["metadata"]["name"], body
            )

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            with self._request("delete", api.PLURAL):
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
            with self._request("create", "configmaps"):
                self.core.create_namespaced_config_map(ns, cm)
        except ApiException as e:
            if e.status != 409:
                raise
            with self._request("get", "configmaps"):
                current = self.core.read_namespaced_config_map(name, ns)
            if (current.data or {}) != cm["data"]:  # spec changed since the last attempt
                with self._request("patch", "configmaps"):
                    self.core.patch_namespaced_config_map(name, ns, {"data": cm["data"]})

    def create_pod(self, pod: dict[str, Any]) -> bool:
        """True if created, False if it already existed."""
        try:
            with self._request("create", "pods"):
                self.core.create_namespaced_pod(pod["metadata"]["namespace"], pod)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with self._request("get", "pods"):
                pod = self.core.read_namespaced_pod(name, namespace)
            return self.client.sanitize_for_serialization(pod)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def delete_pod(self, namespace: str, name: str) -> None:
        try:
            with self._request("delete", "pods"):
                self.core.delete_namespaced_pod(name, namespace)
        except ApiException as e:
            if e.status != 404:
                raise


def load_client_config() -> None:
    """In-cluster credentials, else $KUBECONFIG as it is now (the client library's default path is
    frozen when it is imported). Called once at startup, before the first `Kube()`."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


def api_error_message(e: ApiException) -> str:
    """The API server's own message from an error response (what a user should read)."""
    try:
        return json.loads(e.body or "{}").get("message") or str(e.reason)
    except ValueError:
        return (e.body or str(e.reason))[:800]
