"""The inputs of one trainer process outside a cluster: its config as the operator would render
it (small defaults) and its environment. Used by the trainer tests and bench/."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kubetune_dev.versions import REPO


def trainer_config(
    *,
    bucket: str,
    endpoint: str,
    model_dir,
    data_uri: str,
    name: str = "job",
    namespace: str = "ns",
    method: str = "lora",
    training: dict | None = None,
    checkpoints: dict | None = None,
    dataset: dict | None = None,
    lora: dict | None = None,
    output: dict | None = None,
    **top,
) -> dict:
    """A TrainerConfig as the operator would render it (JSON, camelCase), small defaults."""
    tr = {
        "maxSteps": 10,
        "learningRate": 0.01,
        "batchSize": 4,
        "maxSeqLength": 64,
        "loggingSteps": 1,
        "warmupRatio": 0.0,
        "gradientCheckpointing": "never",
        "lrScheduler": "constant",
    }
    tr.update(training or {})
    ck = {"uri": f"s3://{bucket}/checkpoints", "everySteps": 4, "everyMinutes": None, "keepLast": 3}
    ck.update(checkpoints or {})
    ds = {"uri": data_uri, "format": "instruction"}
    ds.update(dataset or {})
    cfg = {
        "job": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "baseModel": {"uri": str(model_dir)},
        "dataset": ds,
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, **(lora or {})},
        "training": tr,
        "checkpoints": ck,
        "output": {"uri": f"s3://{bucket}/output", **(output or {})},
        "s3": {"endpoint": endpoint},
        "progressIntervalSeconds": 0.5,
    }
    cfg.update(top)
    return cfg


def trainer_env(tmp: Path, cfg: dict, s3_env: dict, **extra) -> dict:
    """Environment for one trainer process: config file, scratch, ports, credentials."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp / "trainer-config.json"
    cfg_path.write_text(json.dumps(cfg))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "KUBETUNE_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK"))
    }
    env.update(
        {
            "KUBETUNE_CONFIG": str(cfg_path),
            "KUBETUNE_WORK_DIR": str(tmp / "work"),
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_TERMINATION_LOG": str(tmp / "termination-log"),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO / "trainer") + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(s3_env)
    env.update({k: str(v) for k, v in extra.items()})
    return env
