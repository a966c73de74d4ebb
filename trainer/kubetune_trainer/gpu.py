"""Whether this process trains on CUDA, and a fast, clear failure when the job asked for GPUs and
CUDA is not usable — never a silent CPU run on a GPU node (at GPU prices, 100x slower).

The usual causes, each named in the message with its fix: a CPU-only torch in the image; no NVIDIA
driver in the container (device plugin / container toolkit missing, or the pod got no GPU); a
driver older than the CUDA this torch was built for (PyPI's default torch 2.15 wheel is CUDA 13.2
and needs driver >= 580); CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES hiding the devices.

The failure is a UserError (exit code 2, not retried): the image and the node pool are fixed by the
spec (pod.image, resources.gpuType, pod.nodeSelector) and the cluster, so a new pod meets the same
driver and the same torch; each retry would pay for a GPU node's start to fail the same way. The
condition message tells the user what to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import logs
from .errors import UserError


class CudaUnusable(UserError):
    """The job asked for GPUs and this process cannot use CUDA."""


def _nvml() -> dict[str, Any]:
    """Driver facts from NVML (nvidia-ml-py, module pynvml) when it and a driver are present."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return {"nvml": "nvidia-ml-py not installed"}
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no libnvidia-ml.so in the container, or no driver loaded
        return {"nvml": f"NVML unavailable ({e})"}
    try:
        facts: dict[str, Any] = {"driver": _text(pynvml.nvmlSystemGetDriverVersion())}
        v = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040: the newest CUDA this driver runs
        facts["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
        facts["nvml_devices"] = pynvml.nvmlDeviceGetCount()
        return facts
    except Exception as e:
        return {"nvml": f"NVML query failed ({e})"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def diagnose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What this process can see: torch's CUDA build, the driver, the visible devices, and why
    torch cannot initialise CUDA."""
    import torch

    env = os.environ if environ is None else environ
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # None: a CPU-only build
        "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"),
        "NVIDIA_VISIBLE_DEVICES": env.get("NVIDIA_VISIBLE_DEVICES"),
    }
    facts.update(_nvml())
    try:
        facts["cuda_available"] = torch.cuda.is_available()
        facts["devices"] = torch.cuda.device_count()
        if not facts["cuda_available"] and torch.version.cuda is not None:
            torch.cuda.init()  # raises with torch's own reason (driver too old, no device, ...)
    except Exception as e:
        facts["cuda_error"] = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return facts


def _version(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in (text or "").split(".")[:2])
    except ValueError:
        return ()


def fix_for(facts: Mapping[str, Any]) -> str:
    """The likely cause and its fix, from the facts."""
    if facts.get("torch_cuda") is None:
        return "this image's torch is a CPU-only build: run the GPU trainer image (pod.image; Dockerfile.trainer)"
    cuda_env, nvidia_env = facts.get("CUDA_VISIBLE_DEVICES"), facts.get("NVIDIA_VISIBLE_DEVICES")
    if (cuda_env is not None and cuda_env.strip() in ("", "-1")) or (
        nvidia_env is not None and nvidia_env.strip().lower() in ("", "void", "none")
    ):
        return (
            "the visible-devices variables hide every GPU: remove CUDA_VISIBLE_DEVICES/NVIDIA_VISIBLE_DEVICES "
            "from pod.env"
        )
    if "driver" not in facts:
        return (
            "no NVIDIA driver is visible in the container: the node needs the NVIDIA driver, container toolkit "
            "and device plugin, and the pod must be given nvidia.com/gpu (resources.gpus; check pod.nodeSelector)"
        )
    need, have = _version(facts.get("torch_cuda")), _version(facts.get("driver_cuda"))
    if need and have and have < need:
        return (
            f"the node's driver {facts['driver']} runs CUDA up to {facts['driver_cuda']} but this torch needs "
            f"CUDA {facts['torch_cuda']}: upgrade the driver, pick nodes with a newer one (resources.gpuType, "
            f"pod.nodeSelector), or use a trainer image whose torch is built for CUDA <= {facts['driver_cuda']}"
        )
    return "check the node's GPU (nvidia-smi) and the device plugin; see cuda_error"


def use_cuda(gpus_requested: int, force_cpu: bool, environ: Mapping[str, str] | None = None) -> bool:
    """True when this process trains on CUDA. A job that asked for GPUs and cannot use them fails
    (CudaUnusable); KUBETUNE_FORCE_CPU is the explicit, logged way to run such a job on the CPU."""
    import torch

    if force_cpu:
        if gpus_requested:
            logs.log("cuda_disabled", "warning", reason="KUBETUNE_FORCE_CPU=1", gpus_requested=gpus_requested)
        return False
    if not gpus_requested:
        return bool(torch.cuda.is_available())
    if torch.cuda.is_available() and torch.cuda.device_count() >= 1:
        return True
    facts = diagnose(environ)
    shown = ", ".join(f"{k}={facts[k]}" for k in facts)
    raise CudaUnusable(
        f"resources.gpus={gpus_requested} but CUDA is not usable in this trainer ({shown}); fix: {fix_for(facts)}"
    )
