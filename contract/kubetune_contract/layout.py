"""Paths, ports and limits the operator and the trainer must agree on."""

from __future__ import annotations

# The trainer config: a ConfigMap key, mounted as a file.
CONFIG_PATH = "/etc/kubetune/trainer-config.json"
CONFIG_KEY = "trainer-config.json"

# The trainer's HTTP port: /metrics (Prometheus) and /progress (ProgressRecord JSON).
METRICS_PORT = 9400
RENDEZVOUS_PORT = 29500  # torch.distributed store on rank 0

# The final ProgressRecord, which the kubelet hands to the operator as the termination message.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_LIMIT = 4096  # what the kubelet keeps of a termination message
MESSAGE_MAX_CHARS = 2048  # ProgressRecord.message; longer ones are cut (status conditions stay small)

# An emptyDir the operator mounts on every trainer pod; everything the trainer writes goes here.
SCRATCH_DIR = "/scratch"
SCRATCH_WORK_DIR = f"{SCRATCH_DIR}/kubetune"
SCRATCH_HF_HOME = f"{SCRATCH_DIR}/hf"
SCRATCH_CACHE = f"{SCRATCH_DIR}/cache"  # XDG, Triton, CUDA and torch caches (the root filesystem is read-only)
DEFAULT_WORK_DIR = "/tmp/kubetune"  # outside a pod (tests, a laptop)
TMP_DIR = "/tmp"  # an emptyDir too: libraries that ignore TMPDIR still find it writable

# The trainer image's user (Dockerfile.trainer): numeric, so Pod Security `restricted` can check runAsNonRoot.
TRAINER_UID = 10001
TRAINER_GID = 10001

# pvc://claim/path URIs: the operator mounts claim <claim> (read-only) at PVC_MOUNT_ROOT/<claim>,
# and the trainer reads <path> below it.
PVC_MOUNT_ROOT = "/mnt/kubetune/pvc"
