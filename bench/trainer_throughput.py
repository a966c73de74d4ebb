"""Trainer throughput: kubetune's training loop vs a plain transformers.Trainer + peft baseline.

For one model directory, method and sequence length, both train the same number of optimizer
steps on the *same packed sequences* (built once by kubetune_trainer.data), same batch size,
learning rate, gradient checkpointing and precision, each in its own fresh process. Reported:
training tokens per second of wall time and per CPU-second (non-padding tokens over the training
loop itself, warm-up steps excluded; the CPU-time figure is the stable one on a shared machine),
peak memory (process max RSS on CPU; torch.cuda.max_memory_allocated on GPU) and ours/baseline
ratios. Runs alternate (ours, baseline, baseline, ours, ...) and medians are reported.

Ours runs the real `python -m kubetune_trainer` against a real MinIO (checkpoints + output; the
checkpoint interval is left off so the loop itself is measured); the baseline saves nothing.

    python bench/trainer_throughput.py --build-tiny 64x2 --method lora --seq-len 256 --steps 30
    python bench/trainer_throughput.py --model-dir /models/x --method full --seq-len 1024

Prints a JSON line per run and a markdown table row at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune_dev.s3server import MinioServer
from kubetune_dev.tiny_model import build_tiny_model, text_records, write_jsonl
from kubetune_dev.trainer_inputs import trainer_config, trainer_env
from kubetune_dev.versions import REPO

PY = sys.executable


# ------------------------------------------------------------------------------------------
# the baseline, run in a child process: python bench/trainer_throughput.py --baseline-child ARGS.json


def baseline_child(spec_path: str) -> None:
    import resource

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from kubetune_trainer.data import Sequence, collate_padded

    spec = json.loads(Path(spec_path).read_text())
    seqs = [Sequence(**s) for s in json.loads(Path(spec["sequences"]).read_text())]
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=dtype if spec["method"] == "lora" else torch.float32
    )
    model.config.use_cache = False
    if spec["method"] == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=spec["r"],
                lora_alpha=2 * spec["r"],
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    counted = {"tokens": 0}

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(seqs)

        def __getitem__(self, i):
            return seqs[i]

    def collator(batch):
        counted["tokens"] += sum(len(s) for s in batch)
        return collate_padded(batch, spec["pad_id"])

    args = TrainingArguments(
        output_dir=spec["out"],
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=spec["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=spec["precision"] == "bf16" and cuda,
        use_cpu=not cuda,
        remove_unused_columns=False,
        seed=0,
        max_grad_norm=1.0,
    )
    from transformers import TrainerCallback

    marks = {}

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (spec["warmup"], spec["steps"]):
                if cuda:
                    torch.cuda.synchronize()
                marks[state.global_step] = (time.perf_counter(), time.process_time(), counted["tokens"])

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collator, callbacks=[Mark()])
    out = tr.train()
    (t0, c0, k0), (t1, c1, k1) = marks[spec["warmup"]], marks[spec["steps"]]
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        "BENCH_RESULT "
        + json.dumps(
            {
                "tokens": k1 - k0,
                "seconds": t1 - t0,
                "cpu_seconds": c1 - c0,
                "peak_bytes": peak,
                "loss": out.training_loss,
            }
        )
    )


# ------------------------------------------------------------------------------------------
# ours: the real trainer process

OURS_WRAPPER = r"""
import json, os, resource, sys, time, torch
from kubetune_trainer import train
from kubetune_trainer.__main__ import main
WARMUP, STEPS = int(os.environ["BENCH_WARMUP"]), int(os.environ["BENCH_STEPS"])
marks = {}
_after = train.Run._after_step
def after_step(self, loss, tokens, thr):
    if self.state.global_step in (WARMUP, STEPS):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        marks[self.state.global_step] = (time.perf_counter(), time.process_time(), self.state.tokens_seen, loss)
    return _after(self, loss, tokens, thr)
train.Run._after_step = after_step
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
rc = main([])
if rc != 0:
    print("BENCH_RESULT " + json.dumps({"rc": rc}))
    sys.exit(0)
peak = (
    torch.cuda.max_memory_allocated()
    if torch.cuda.is_available()
    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
)
(w0, c0, k0, _), (w1, c1, k1, loss) = marks[WARMUP], marks[STEPS]
print("BENCH_RESULT " + json.dumps({"rc": rc, "peak_bytes": peak, "tokens": k1 - k0, "seconds": w1 - w0,
                                    "cpu_seconds": c1 - c0, "loss": loss}))
"""


def run_ours(args, model_dir: Path, data: Path, minio, bucket: str, work: Path, env_base: dict) -> dict:

    cfg = trainer_config(
        bucket=bucket,
        endpoint=minio.endpoint,
        model_dir=model_dir,
        data_uri=str(data),
        name=f"bench-{time.time_ns()}",
        method=args.method,
        lora={"r": args.r, "alpha": 2 * args.r, "dropout": 0.0},
        training={
            "maxSteps": args.steps,
            "batchSize": args.batch_size,
            "maxSeqLength": args.seq_len,
            "learningRate": args.lr,
            "lrScheduler": "constant",
            "loggingSteps": 10,
            "gradientCheckpointing": "always" if args.gradient_checkpointing else "never",
            "precision": args.precision,
            "maxGradNorm": 1.0,
        },
        checkpoints={"everySteps": None, "everyMinutes": None},
        dataset={"format": "text"},
    )
    env = trainer_env(work / "ours", cfg, minio.env(), BENCH_WARMUP=args.warmup, BENCH_STEPS=args.steps, **env_base)
    log = work / "ours.log"
    with open(log, "wb") as f:
        r = subprocess.run([PY, "-c", OURS_WRAPPER], env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO))
    text = log.read_text()
    if r.returncode != 0:
        raise SystemExit(f"our trainer failed ({r.returncode}):\n{text[-4000:]}")
    res = json.loads(text.split("BENCH_RESULT ", 1)[1].splitlines()[0])
    if res["rc"] != 0:
        raise SystemExit(f"our trainer exited {res['rc']}:\n{text[-4000:]}")
    return res


def run_baseline(args, model_dir: Path, seq_file: Path, pad_id: int, work: Path, env_base: dict) -> dict:
    spec = {
        "model_dir": str(model_dir),
        "sequences": str(seq_file),
        "pad_id": pad_id,
        "method": args.method,
        "r": args.r,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "gradient_checkpointing": args.gradient_checkpointing,
        "precision": args.precision,
        "out": str(work / "hf-out"),
        "warmup": args.warmup,
    }
    p = work / "baseline.json"
    p.write_text(json.dumps(spec))
    env = dict(os.environ, **env_base, PYTHONPATH=os.pathsep.join([str(REPO / "contract"), str(REPO / "trainer")]))
    r = subprocess.run([PY, __file__, "--baseline-child", str(p)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"baseline failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return json.loads(r.stdout.split("BENCH_RESULT ", 1)[1].splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--build-tiny", metavar="HIDDENxLAYERS", help="build a random Llama (e.g. 64x2, 256x4)")
    ap.add_argument("--method", choices=["lora", "full"], default="lora")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs; medians are reported")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of both runs (1: CPU time is a stable measure on a shared machine)",
    )
    args = ap.parse_args()
    if args.baseline_child:
        return baseline_child(args.baseline_child)

    from kubetune_contract.config import DatasetSpec
    from kubetune_trainer.data import build_sequences, encode_files

    work = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    if args.build_tiny:
        hidden, layers = (int(x) for x in args.build_tiny.lower().split("x"))
        model_dir = build_tiny_model(work / "model", hidden=hidden, layers=layers, heads=max(1, hidden // 32))
        label = f"random Llama h{hidden} L{layers}"
    else:
        model_dir = args.model_dir
        label = str(model_dir)
    data = write_jsonl(work / "train.jsonl", text_records(args.records, seed=0, length=40))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex, _ = encode_files([(data, "train.jsonl")], DatasetSpec(uri=str(data), format="text"), tok, args.seq_len)
    seqs = build_sequences(ex, args.seq_len, packing=True)
    seq_file = work / "sequences.json"
    seq_file.write_text(json.dumps([s.__dict__ for s in seqs]))
    env_base = {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }

    import statistics

    runs_ours, runs_base = [], []
    with MinioServer() as minio:
        bucket = minio.make_bucket("bench")
        for i in range(args.repeats):  # alternate, so slow phases of a noisy machine hit both
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    runs_ours.append(run_ours(args, model_dir, data, minio, bucket, work, env_base))
                else:
                    runs_base.append(run_baseline(args, model_dir, seq_file, tok.pad_token_id, work, env_base))

    def med(runs):
        tps = statistics.median(r["tokens"] / r["seconds"] for r in runs)
        tpc = statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs)
        return {
            "tps": tps,
            "tpc": tpc,
            "peak_bytes": max(r["peak_bytes"] for r in runs),
            "loss": runs[-1]["loss"],
            "all_tps": [round(r["tokens"] / r["seconds"], 1) for r in runs],
            "all_tpc": [round(r["tokens"] / r["cpu_seconds"], 1) for r in runs],
        }

    ours, base = med(runs_ours), med(runs_base)
    n_params = None
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        n_params = f"h{cfg['hidden_size']} L{cfg['num_hidden_layers']} V{cfg['vocab_size']}"
    except Exception:
        pass
    row = {
        "model": label,
        "shape": n_params,
        "method": args.method,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "threads": args.threads,
        "ours_tokens_per_s": round(ours["tps"], 1),
        "baseline_tokens_per_s": round(base["tps"], 1),
        "ours_tokens_per_cpu_s": round(ours["tpc"], 1),
        "baseline_tokens_per_cpu_s": round(base["tpc"], 1),
        "ours_runs": ours["all_tps"],
        "baseline_runs": base["all_tps"],
        "ours_runs_cpu": ours["all_tpc"],
        "baseline_runs_cpu": base["all_tpc"],
        "load_avg": os.getloadavg(),
        "ours_peak_mib": round(ours["peak_bytes"] / 2**20, 1),
        "baseline_peak_mib": round(base["peak_bytes"] / 2**20, 1),
        "machine": platform.node(),
        "python": platform.python_version(),
    }
    row["throughput_ratio"] = round(row["ours_tokens_per_s"] / row["baseline_tokens_per_s"], 3)
    row["cpu_throughput_ratio"] = round(row["ours_tokens_per_cpu_s"] / row["baseline_tokens_per_cpu_s"], 3)
    row["memory_ratio"] = round(row["ours_peak_mib"] / row["baseline_peak_mib"], 3)
    import shutil

    if not os.environ.get("KUBETUNE_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(row))
    print(
        f"| {label} | {args.method} | {args.seq_len} | {args.batch_size} | {row['ours_tokens_per_cpu_s']} | "
        f"{row['baseline_tokens_per_cpu_s']} | {row['cpu_throughput_ratio']} | {row['ours_tokens_per_s']} | "
        f"{row['baseline_tokens_per_s']} | {row['throughput_ratio']} | {row['ours_peak_mib']} | "
        f"{row['baseline_peak_mib']} | {row['memory_ratio']} |"
    )


if __name__ == "__main__":
    main()
