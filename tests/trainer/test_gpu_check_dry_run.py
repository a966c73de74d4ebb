"""bench/gpu_check.py's --dry-run: the GPU check's children run on the CPU with tiny shapes and the
parent prints one JSON, so the script that waits for a GPU is known to work up to CUDA. The budget is
generous: the children's deadlines are sized for the GPU machine, not a loaded 2-core CI box."""

import json
import subprocess
import sys

from kubetune_dev.versions import REPO


def test_gpu_check_dry_run_prints_one_json_with_every_child(tmp_path):
    out = tmp_path / "r.json"
    only = "failfast,varlen_kernel,baseline_lora,ours_lora,ours_qlora"  # the rest: the same children
    cmd = [sys.executable, str(REPO / "bench/gpu_check.py"), "--dry-run", "--budget", "400", "--only", only]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=480, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["env"]["status"] == "ok" and res["build_model"]["status"] == "ok"
    assert res["failfast"]["refused"] is True and "resources.gpus=1" in res["failfast"]["message"]
    assert res["varlen_kernel"]["max_abs_diff"] < 1e-5
    for k in ("ours_lora", "baseline_lora"):
        assert res[k]["status"] == "ok" and res[k]["tokens_per_s"] > 0, res[k]
    assert res["ours_lora"]["estimate_gib"] > 0 and res["ours_lora"]["checkpointing"] == ["never", 1]
    assert res["ours_qlora"]["status"] == "skipped"  # no GPU, no bitsandbytes: reported, not failed
    assert res["lora_speedup_vs_baseline"] > 0
