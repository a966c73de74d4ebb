"""Creating and reading FineTuneJobs in tests (the manifests come from kubetune_dev.jobs)."""

from __future__ import annotations

from typing import Any

from kubetune_operator.api import GROUP, PLURAL, VERSION


class Jobs:
    """FineTuneJob CRUD in one namespace."""

    def __init__(self, api_client, namespace: str):
        import kubernetes

        self.ns = namespace
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, job)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def condition(self, name: str, ctype: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == ctype), None)

    def pods(self, name: str) -> list:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"kubetune.io/job-name={name}").items

    def events(self, name: str) -> list:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]

    def secret(self, name: str = "s3-creds", **data: str) -> None:
        data = data or {"AWS_ACCESS_KEY_ID": "minio", "AWS_SECRET_ACCESS_KEY": "minio123"}
        self.core.create_namespaced_secret(self.ns, {"metadata": {"name": name}, "stringData": data})
