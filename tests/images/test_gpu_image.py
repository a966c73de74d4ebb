"""The GPU trainer image (hack/images.sh trainer-gpu, Dockerfile.trainer's defaults) works as far as a
machine without a GPU can tell: it is built (cached after the first time), then checked with
`buildah run --network none` in one container, as the pod would run it (uid 10001, the operator's
scratch env, /scratch mounted):

- bitsandbytes, deepspeed, liger-kernel, nvidia-ml-py and datasets import at hack/constraints.txt's pins;
- DeepSpeed has no prebuilt op, and every preset the trainer ships trains a step on a real engine with
  torch's AdamW while any op load / JIT compile raises (none needs nvcc or g++ at run time);
- gcc is there and Triton's own build path (the one its CUDA launcher takes) compiles a C extension;
- a job that asked for a GPU exits 2 at start, its message naming torch's CUDA, the driver and the fix;
- it runs as a non-root uid and writes nothing outside /scratch.

Skipped, saying why, without buildah (and root) to build and run images. What needs a GPU (CUDA
kernels of bitsandbytes/Liger/DeepSpeed) is bench/gpu_check.py's part.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kubetune_contract import layout
from kubetune_contract.progress import ExitCode
from kubetune_dev.trainer_inputs import trainer_config
from kubetune_dev.versions import REPO
from kubetune_operator.render import SCRATCH_ENV

pytestmark = [
    pytest.mark.images,
    pytest.mark.timeout(1800),  # a cold build; warm, the module takes about a minute
    pytest.mark.skipif(
        shutil.which("buildah") is None or os.geteuid() != 0,
        reason="needs buildah (as root) to build and run the GPU trainer image (hack/images.sh trainer-gpu)",
    ),
]
VERSION = next(
    line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("version")
)
IMAGE = f"localhost/kubetune-trainer-gpu:{VERSION}"
ENV = {**os.environ, "BUILDAH_ISOLATION": os.environ.get("BUILDAH_ISOLATION", "oci")}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "hack" / "constraints.txt").read_text().splitlines():
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def _sh(*cmd: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    t0 = time.monotonic()
    build = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "--no-load", "trainer-gpu"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    print(f"built {IMAGE} in {time.monotonic() - t0:.0f}s")
    return IMAGE


@pytest.fixture(scope="module")
def ran(image, tmp_path_factory) -> dict:
    """One container of the image; the probe, gcc and a GPU job's start run in it as a pod would."""
    tmp = tmp_path_factory.mktemp("gpu-image")
    scratch, config = tmp / "scratch", tmp / "config"
    scratch.mkdir()
    config.mkdir()
    os.chown(scratch, 10001, 10001)
    cfg = trainer_config(
        bucket="bucket",
        endpoint="http://127.0.0.1:9",
        model_dir="/scratch/no-model",
        data_uri="/scratch/no-data",
        gpusPerWorker=1,
    )
    (config / layout.CONFIG_KEY).write_text(json.dumps(cfg))
    ctr = _sh("buildah", "from", "--quiet", image).stdout.strip()
    try:
        mnt = Path(_sh("buildah", "mount", ctr).stdout.strip())
        marker = tmp / "marker"
        marker.touch()
        time.sleep(1.1)
        env = [f"{e['name']}={e['value']}" for e in SCRATCH_ENV] + [
            f"KUBETUNE_CONFIG={layout.CONFIG_PATH}",
            "KUBETUNE_TERMINATION_LOG=/scratch/termination-log",
            "KUBETUNE_METRICS_PORT=off",
        ]
        run = ["buildah", "run", "--network", "none", "--volume", f"{scratch}:{layout.SCRATCH_DIR}",
               "--volume", f"{Path(__file__).parent}:/probe:ro",
               "--volume", f"{config}:{layout.CONFIG_PATH.rsplit('/', 1)[0]}:ro"]  # fmt: skip
        for e in env:
            run += ["--env", e]
        out: dict = {"user": _sh("buildah", "inspect", "--type", "image", "--format", "{{.OCIv1.Config.User}}", image)
                     .stdout.strip()}  # fmt: skip
        probe = _sh(*run, ctr, "--", "python3", "/probe/probe_gpu_image.py", timeout=600, check=False)
        lines = [x for x in probe.stdout.splitlines() if x.startswith("PROBE ")]
        assert probe.returncode == 0 and lines, probe.stdout[-3000:] + probe.stderr[-3000:]
        out["probe"] = json.loads(lines[-1][len("PROBE ") :])
        out["gcc"] = _sh(*run, ctr, "--", "gcc", "--version", check=False)
        t0 = time.monotonic()
        out["failfast"] = _sh(*run, ctr, "--", "kubetune-train", timeout=300, check=False)
        out["failfast_seconds"] = time.monotonic() - t0
        term = scratch / "termination-log"
        out["termination"] = json.loads(term.read_text()) if term.exists() else None
        # what the runs wrote into the container's own filesystem (/scratch is a mount, not in it)
        skip = {"proc", "sys", "dev", "run", "tmp/.buildah", "scratch"}
        out["written"] = sorted(
            str(p.relative_to(mnt))
            for p in mnt.rglob("*")
            if p.stat(follow_symlinks=False).st_mtime > marker.stat().st_mtime
            and not str(p.relative_to(mnt)).startswith(tuple(skip))
            # buildah's own: the network files and the volumes' mount points (etc/kubetune, probe)
            and str(p.relative_to(mnt))
            not in ("etc/hosts", "etc/resolv.conf", "etc/hostname", "etc", "etc/kubetune", "probe")
        )
        return out
    finally:
        _sh("buildah", "umount", ctr, check=False)
        _sh("buildah", "rm", ctr, check=False)


def test_the_gpu_packages_import_at_their_pins(ran):
    pins = _pins()
    versions = ran["probe"]["versions"]
    assert ran["probe"]["imports"] == "ok"
    for name in ("torch", "triton", "bitsandbytes", "deepspeed", "liger-kernel", "nvidia-ml-py", "datasets"):
        assert versions[name] == pins[name], (name, versions[name])
    assert ran["probe"]["deepspeed_prebuilt_ops"] == []  # DS_BUILD_OPS=0: a pure-Python DeepSpeed


def test_every_deepspeed_preset_trains_with_torch_adamw_and_compiles_no_op(ran):
    engines = ran["probe"]["deepspeed_engines"]
    assert set(engines) == {"zero2", "zero2-offload", "zero3", "zero3-offload"}
    for name, e in engines.items():
        assert e.get("basic_optimizer") == "torch.optim.adamw.AdamW", (name, e)
    assert ran["probe"]["deepspeed_op_loads"] == []  # no FusedAdam (nvcc), no DeepSpeedCPUAdam (g++)


def test_triton_finds_a_c_compiler_and_python_headers(ran):
    assert ran["gcc"].returncode == 0 and ran["gcc"].stdout.startswith("gcc"), ran["gcc"].stderr
    assert ran["probe"]["triton_c_build"] == 42  # Triton's build path: gcc + Python.h, loaded


def test_a_gpu_job_without_a_driver_fails_at_start_naming_the_driver_and_cuda(ran):
    ff = ran["failfast"]
    assert ff.returncode == ExitCode.USER_ERROR, ff.stdout[-3000:] + ff.stderr[-3000:]
    message = ran["termination"]["message"]
    for fact in ("resources.gpus=1", "torch_cuda=13.", "nvml=", "NVIDIA_VISIBLE_DEVICES=", "fix: "):
        assert fact in message, message
    assert "no NVIDIA driver is visible in the container" in message
    assert ran["failfast_seconds"] < 120


def test_the_image_runs_as_non_root_and_writes_only_scratch(ran):
    assert ran["user"] == "10001:10001"
    assert ran["probe"]["uid"] == 10001
    assert ran["written"] == [], ran["written"]
