"""The operator's state, in one object built once at startup (handlers.startup) and handed to every
pass: settings, the Kubernetes client, what this operator last wrote, per-job locks and metrics.
Nothing here is built at import time."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .kube import Kube
from .metrics import OperatorMetrics
from .settings import Settings

JobKey = tuple[str, str]  # (namespace, name)


def job_key(job: dict[str, Any]) -> JobKey:
    return (job["metadata"]["namespace"], job["metadata"]["name"])


class OwnWrites:
    """What this operator last wrote to each job: its newest known state, and the
    resourceVersions whose watch events are only the echo of our own writes (nothing to do)."""

    def __init__(self) -> None:
        self.latest: dict[JobKey, dict[str, Any]] = {}
        self.versions: dict[JobKey, deque[str]] = {}

    def record(self, job: dict[str, Any]) -> None:
        key = job_key(job)
        self.latest[key] = job
        self.versions.setdefault(key, deque(maxlen=16)).append(job["metadata"]["resourceVersion"])

    def is_echo(self, job: dict[str, Any]) -> bool:
        return job["metadata"].get("resourceVersion") in self.versions.get(job_key(job), ())

    def seen(self, job: dict[str, Any]) -> None:
        self.latest[job_key(job)] = job

    def forget(self, key: JobKey) -> None:
        self.latest.pop(key, None)
        self.versions.pop(key, None)


@dataclass
class OperatorContext:
    settings: Settings
    kube: Kube
    metrics: OperatorMetrics
    own_writes: OwnWrites = field(default_factory=OwnWrites)
    locks: dict[JobKey, asyncio.Lock] = field(default_factory=dict)
    sweeper: asyncio.Task[None] | None = None  # the periodic sweep (handlers.start_sweep)
    sweep_beat: float = field(default_factory=time.monotonic)  # when the sweep last moved (liveness)

    @classmethod
    def create(cls, settings: Settings) -> OperatorContext:
        """After the client configuration is loaded (kube.load_client_config)."""
        metrics = OperatorMetrics()
        return cls(settings=settings, kube=Kube(requests=metrics.api_requests), metrics=metrics)

    def lock(self, key: JobKey) -> asyncio.Lock:
        """One pass per job at a time."""
        return self.locks.setdefault(key, asyncio.Lock())

    def forget(self, key: JobKey) -> None:
        """The job is gone: drop what was kept for it."""
        self.locks.pop(key, None)
        self.own_writes.forget(key)
