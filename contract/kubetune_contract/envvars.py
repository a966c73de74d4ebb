"""Every environment variable the operator sets on a trainer container or the trainer reads.

torch.distributed's own names where they exist. The trainer reads these once, in its entry
point (`kubetune_trainer.options`); the operator's `render` sets only names defined here (a unit
test checks that).
"""

from __future__ import annotations

# Set by the operator on every trainer container.
CONFIG = "KUBETUNE_CONFIG"  # path to the trainer config (default layout.CONFIG_PATH)
RANK = "RANK"  # the pod's index among the attempt's workers
WORLD_SIZE = "WORLD_SIZE"  # the number of worker pods
MASTER_ADDR = "MASTER_ADDR"  # rank 0's pod IP: it hosts the rendezvous
MASTER_PORT = "MASTER_PORT"
POD_NAME = "KUBETUNE_POD_NAME"
NODE_NAME = "KUBETUNE_NODE_NAME"
ATTEMPT = "KUBETUNE_ATTEMPT"  # 0-based; bumped for each new set of pods (after a preemption)
POD_UID = "KUBETUNE_POD_UID"  # the pod's metadata.uid: with ATTEMPT, the token every write of an attempt carries
METRICS_PORT = "KUBETUNE_METRICS_PORT"  # default layout.METRICS_PORT; 0 = any free port; "off"
WORK_DIR = "KUBETUNE_WORK_DIR"  # local scratch for the model, data and checkpoint staging
HF_HOME = "HF_HOME"  # Hugging Face cache, on scratch
TMPDIR = "TMPDIR"  # temp files, on scratch (the root filesystem may be read-only)
XDG_CACHE_HOME = "XDG_CACHE_HOME"  # torch hub/extensions and other ~/.cache users, on scratch
TRITON_CACHE_DIR = "TRITON_CACHE_DIR"  # Triton's compiled kernels (torch.compile, Liger), on scratch
TRITON_HOME = "TRITON_HOME"  # Triton's ~/.triton, on scratch
CUDA_CACHE_PATH = "CUDA_CACHE_PATH"  # the CUDA driver's JIT cache (~/.nv), on scratch
JOB_COST = "KUBETUNE_JOB_COST"  # JSON (jobcost.JobCostSoFar): the earlier attempts' goodput and cost, for the card
# S3 credentials come from the user's Secret through these standard names (boto3 reads them).
S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"

# Set by the trainer's own launcher for each local process when a pod has several GPUs.
LOCAL_RANK = "LOCAL_RANK"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
LOCAL_WORKER = "KUBETUNE_LOCAL_WORKER"  # "1" on the launcher's children: train, never launch again

# Read by the trainer only; the operator never sets them.
TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # default layout.TERMINATION_LOG
PEAK_FLOPS = "KUBETUNE_PEAK_FLOPS"  # dense peak FLOP/s of one GPU for MFU (default: mfu.PEAK_FLOPS by name)
# Test and demo knobs: reachable from a pod's env (spec.pod.env) so the e2e tests and the demo
# can use them, never set by the operator and not meant for production jobs.
STEP_DELAY_SECONDS = "KUBETUNE_STEP_DELAY_SECONDS"  # sleep after each optimizer step (slow demos)
DIST_TIMEOUT_SECONDS = "KUBETUNE_DIST_TIMEOUT_SECONDS"  # torch.distributed rendezvous timeout
SHUTDOWN_UPLOAD_TIMEOUT = "KUBETUNE_SHUTDOWN_UPLOAD_TIMEOUT"  # seconds SIGTERM waits for an upload
PROCS_PER_WORKER = "KUBETUNE_PROCS_PER_WORKER"  # local processes per pod (CPU tests of the launcher)
FORCE_CPU = "KUBETUNE_FORCE_CPU"  # "1": ignore CUDA even when present

# What the operator may set on a trainer container (besides the user's spec.pod.env).
OPERATOR_SET = frozenset(
    {
        CONFIG,
        RANK,
        WORLD_SIZE,
        MASTER_ADDR,
        MASTER_PORT,
        POD_NAME,
        NODE_NAME,
        ATTEMPT,
        POD_UID,
        METRICS_PORT,
        WORK_DIR,
        HF_HOME,
        TMPDIR,
        XDG_CACHE_HOME,
        TRITON_CACHE_DIR,
        TRITON_HOME,
        CUDA_CACHE_PATH,
        JOB_COST,
        S3_ACCESS_KEY,
        S3_SECRET_KEY,
    }
)
