"""The GPU check: one run (< 9 minutes), every child process with its own deadline, one JSON out.

    python bench/gpu_check.py [--dry-run] [--budget 510] [--out result.json]

On the GPU machine (see hack/gpu-wheels.sh for the wheels it lacks) it measures, on a random-init
Llama-3.2-1B-shaped model (h2048, 16 layers, GQA 32/8, vocab 128256; no hub download) and
synthetic packed data:
- kubetune's own loop (model.load_model, build_training_parts, step.accumulate/optimizer_step)
  against a plain `transformers.Trainer` + PEFT baseline (sdpa, padded (B, L) batches with the
  dense packed mask, checkpointing on, LoRA dropout 0.05): tokens/s, MFU, peak memory, per method
  (lora, qlora, full, zero2; a method whose package is missing is reported as skipped);
- the ladder of the speed changes, each switched off on its own from the all-on LoRA run
  (padding-free attention, Liger, checkpointing auto, LoRA dropout 0 / no fp32 input copy) and
  regional compile switched on;
- the estimator's memory against torch.cuda.max_memory_reserved(), per run;
- the padding-free attention's CUDA kernel against per-example SDPA (max |Δlogits|, bf16);
- the fail-fast check (a job asking for GPUs with CUDA hidden exits as a user error);
- NVML polling cost (one scrape of the trainer's collector) against the step time.

`--dry-run` runs the same children with tiny shapes on the CPU in seconds (tests/unit runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARK = "GPU_CHECK_RESULT "
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, max_position_embeddings=512),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# children (python bench/gpu_check.py --child NAME ARGS.json): each prints one MARK line


def _emit(obj: dict) -> None:
    print(MARK + json.dumps(obj), flush=True)


def _synthetic(vocab: int, seq_len: int, n_seqs: int, seed: int = 0) -> list:
    """Packed sequences of examples 1/8..1/2 of seq_len long (the trainer's Sequence type)."""
    import random

    from kubetune_trainer.data import IGNORE, Example, pack

    rng = random.Random(seed)
    exs = []
    while sum(len(e.input_ids) for e in exs) < n_seqs * seq_len:
        n = rng.randint(seq_len // 8, seq_len // 2)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        exs.append(Example(ids, [IGNORE] + ids[1:], n))
    return pack(exs, seq_len)[:n_seqs]


def _cfg(spec: dict, method: str, training: dict, lora: dict) -> Any:
    from kubetune_contract.config import TrainerConfig
    from kubetune_dev.trainer_inputs import trainer_config

    t = {"batchSize": spec["batch"], "maxSeqLength": spec["seq"], "maxSteps": spec["steps"], "precision": "auto"}
    t.update(training)
    raw = trainer_config(
        bucket="bucket-x", endpoint="http://127.0.0.1:1", model_dir=spec["model_dir"], data_uri="/x",
        method=method, training=t, lora={"r": 16, "alpha": 32, "dropout": 0.0, **lora},
        gpusPerWorker=1 if spec["cuda"] else 0,
    )  # fmt: skip
    return TrainerConfig.model_validate(raw)


def _memory(cuda: bool) -> dict:
    import resource

    import torch

    if cuda:
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}  # fmt: skip
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _estimate_gib(spec: dict, cfg: Any, fused: bool) -> float | None:
    from kubetune_contract import estimate as E

    arch = E.ModelArch.from_config(json.loads(Path(spec["model_dir"], "config.json").read_text()))
    plan = E.Plan(cfg.method, cfg.training, cfg.lora, 1 if spec["cuda"] else 0, 1, fused_cross_entropy=fused)
    cap = None
    if spec["cuda"]:
        import torch

        cap = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = E.resolve_checkpointing(arch, plan, cap)
    return round(E.memory(arch, plan).total / E.GIB, 3)


def child_ours(spec: dict) -> None:
    """kubetune's loop on one configuration (method + ladder toggles)."""
    import torch

    from kubetune_contract.estimate import ModelShape, flops_per_token
    from kubetune_contract.gpus import peak_flops_for
    from kubetune_trainer import data as D
    from kubetune_trainer import model as M
    from kubetune_trainer import speed, step
    from kubetune_trainer.dist import Dist, DistEnv
    from kubetune_trainer.dist import start as dist_start

    cuda = spec["cuda"]
    cfg = _cfg(spec, spec["method"], spec.get("training", {}), spec.get("lora", {}))
    M.check_method_supported(cfg, cuda)
    ds = cfg.training.deepspeed != "none"
    dist = dist_start(DistEnv(), cuda=cuda, timeout_seconds=60, deepspeed=ds) if ds else None
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist = dist or Dist(DistEnv(), device, cuda)
    if spec.get("dense_mask"):  # the ladder's "padding-free off": the old (B, L) layout under sdpa
        D.collate = lambda seqs: D.collate_padded(seqs, 0)  # type: ignore[assignment]
    prec = M.resolve_precision(cfg.training.precision, cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = M.load_model(spec["model_dir"], cfg, prec, device)
    if spec.get("dense_mask"):
        M.unwrap(model).config._attn_implementation = "sdpa"
    parts = M.build_training_parts(model, cfg, prec, spec["steps"], dist)
    seqs = _synthetic(SHAPES[spec["shape"]]["vocab_size"], spec["seq"], spec["batch"] * spec["steps"])
    parts.wrapped.train()
    ac = M.autocast(prec, device, parts)
    times = []
    for i in range(spec["steps"]):
        mb = [seqs[i * spec["batch"] : (i + 1) * spec["batch"]]]
        n = float(sum(s.trained_tokens for s in mb[0]))
        t0 = time.perf_counter()
        out = step.accumulate(mb, parts, dist, ac, n, 0, None)
        if parts.ds_engine is None:
            step.optimizer_step(parts, 1.0)
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0, sum(len(s) for s in mb[0]), out.loss_sum / n if out else None))
    timed = times[spec["warmup"] :] or times
    tps = sum(t[1] for t in timed) / sum(t[0] for t in timed)
    trainable, total = M.trainable_parameters(model)
    shape = ModelShape(total, trainable, SHAPES[spec["shape"]]["num_hidden_layers"],
                       SHAPES[spec["shape"]]["hidden_size"], float(spec["seq"]))  # fmt: skip
    peak = peak_flops_for(torch.cuda.get_device_name(0)) if cuda else None
    fpt = flops_per_token(shape, cfg.method)
    res = {
        "tokens_per_s": round(tps, 1),
        "step_s": round(sum(t[0] for t in timed) / len(timed), 4),
        "mfu": None if peak is None else round(tps * fpt / peak, 4),
        "loss_first_last": [times[0][2], times[-1][2]],
        "checkpointing": list(getattr(M.unwrap(model), "kubetune_checkpointing", ("?", 0))),
        "checkpointed_layers": sum(speed.checkpointed_layers(model)),
        **_memory(cuda),
    }
    fused = cfg.training.liger != "never" and cuda and speed._liger_table() is not None
    res["estimate_gib"] = _estimate_gib(spec, cfg, fused)
    if cuda and res["estimate_gib"]:
        res["estimate_over_reserved"] = round(res["estimate_gib"] / res["peak_reserved_gib"], 3)
    if spec.get("nvml"):
        from kubetune_trainer.metrics import _NvmlCollector

        c = _NvmlCollector()
        if c.available:
            t0 = time.perf_counter()
            for _ in range(20):
                c.collect()
            per = (time.perf_counter() - t0) / 20
            res["nvml_scrape_ms"] = round(per * 1e3, 3)
            res["nvml_scrape_per_step_ratio"] = round(per / res["step_s"], 5)
        else:
            res["nvml_scrape_ms"] = None
    _emit(res)


def child_baseline(spec: dict) -> None:
    """transformers.Trainer + PEFT, the recipe most fine-tunes start from."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from kubetune_trainer.data import collate_padded

    cuda = spec["cuda"]
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    if spec["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))  # fmt: skip
    seqs = _synthetic(SHAPES[spec["shape"]]["vocab_size"], spec["seq"], spec["batch"] * spec["steps"])
    marks: dict[int, float] = {}

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
        learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no",
        report_to=[], disable_tqdm=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=cuda, use_cpu=not cuda,
        remove_unused_columns=False, dataloader_num_workers=0,
    )  # fmt: skip
    tr = Trainer(model=model, args=args, train_dataset=seqs, data_collator=lambda b: collate_padded(b, 0),
                 callbacks=[Mark()])  # fmt: skip
    tr.train()
    w, n = spec["warmup"], spec["steps"]
    tokens = sum(len(s) for s in seqs[w * spec["batch"] : n * spec["batch"]])
    tps = tokens / (marks[n] - marks[w]) if n > w else None
    _emit({"tokens_per_s": None if tps is None else round(tps, 1), **_memory(cuda)})


def child_varlen(spec: dict) -> None:
    """The padding-free attention's kernel against per-example SDPA, on the device."""
    import torch

    from kubetune_trainer import attention as A

    dev = "cuda" if spec["cuda"] else "cpu"
    dt = torch.bfloat16 if spec["cuda"] else torch.float32
    torch.manual_seed(0)
    lens = [37, 512, 5, 1000, 300]
    t, h, kv, d = sum(lens), 32, 8, 64
    q, k, v = (torch.randn(1, n, t, d, device=dev, dtype=dt) for n in (h, kv, kv))
    bounds = [0]
    for n in lens:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    out, _ = A.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=max(lens))
    ref = A._per_example(*(x[0].transpose(0, 1) for x in (q, k, v)), bounds, None, 0.0, None)
    _emit({"fast_path": A._fast_path(q.transpose(1, 2), 0.0, None),
           "max_abs_diff": float((out[0].float() - ref.float()).abs().max())})  # fmt: skip


def child_failfast(spec: dict) -> None:
    """A job that asks for a GPU with CUDA hidden: the trainer's check refuses as a user error."""
    from kubetune_trainer.errors import UserError
    from kubetune_trainer.gpu import use_cuda

    try:
        use_cuda(1, force_cpu=False)
    except UserError as e:
        _emit({"refused": True, "message": str(e)[:400]})
        return
    _emit({"refused": False})


def child_env(spec: dict) -> None:
    import importlib.metadata as md

    import torch

    pk = {}
    for name in ("transformers", "peft", "bitsandbytes", "liger-kernel", "deepspeed", "nvidia-ml-py", "pydantic"):
        try:
            pk[name] = md.version(name)
        except md.PackageNotFoundError:
            pk[name] = None
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "packages": pk}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    _emit(info)


def child_build(spec: dict) -> None:
    """The random-init model directory every other child loads (no hub download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[spec["shape"]]))
    model.to(torch.bfloat16 if spec["cuda"] else torch.float32).save_pretrained(spec["model_dir"])
    _emit({"params": sum(p.numel() for p in model.parameters())})


CHILDREN = {
    f.__name__[6:]: f for f in (child_ours, child_baseline, child_varlen, child_failfast, child_env, child_build)
}


# ---------------------------------------------------------------------------------------------
# the parent: the plan, deadlines, one JSON


def plan(dry: bool) -> list[tuple[str, str, dict, float]]:
    """(label, child, spec overrides, deadline seconds) in order of importance."""
    d = 0.25 if dry else 1.0
    runs: list[tuple[str, str, dict, float]] = [
        ("env", "env", {}, 30),
        ("build_model", "build", {}, 90 * d),
        ("failfast", "failfast", {"env": {"CUDA_VISIBLE_DEVICES": ""}}, 30),
        ("varlen_kernel", "varlen", {}, 40 * d),
        ("baseline_lora", "baseline", {"method": "lora"}, 75 * d),
        ("ours_lora", "ours", {"method": "lora", "nvml": True}, 60 * d),
        ("ours_qlora", "ours", {"method": "qlora"}, 60 * d),
        ("ours_full", "ours", {"method": "full", "training": {"learningRate": 1e-5}}, 60 * d),
        ("ours_zero2", "ours", {"method": "lora", "training": {"deepspeed": "zero2"}}, 60 * d),
        ("baseline_full", "baseline", {"method": "full"}, 60 * d),
    ]
    ladder = {
        "ladder_dense_mask": {"dense_mask": True},
        "ladder_liger_never": {"training": {"liger": "never"}},
        "ladder_checkpointing_always": {"training": {"gradientCheckpointing": "always"}},
        "ladder_lora_dropout_0.05": {"lora": {"dropout": 0.05}},
        "ladder_compile_regional": {"training": {"compile": "regional"}},
    }
    runs += [(k, "ours", {"method": "lora", **v}, 60 * d) for k, v in ladder.items()]
    return runs


def run_child(child: str, spec: dict, deadline: float, env_extra: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    env = dict(os.environ, **(env_extra or {}))
    t0 = time.monotonic()
    try:
        r = subprocess.run([sys.executable, __file__, "--child", child, f.name], env=env, capture_output=True,
                           text=True, timeout=deadline, cwd=str(REPO))  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "deadline_s": round(deadline, 1)}
    finally:
        os.unlink(f.name)
    wall = round(time.monotonic() - t0, 2)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(MARK)]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-6:]
        skipped = any(
            s in "\n".join(tail) for s in ("needs bitsandbytes", "needs the deepspeed", "needs a GPU", "needs GPUs")
        )
        return {"status": "skipped" if skipped else "failed", "wall_s": wall, "error": "\n".join(tail)[-800:]}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1][len(MARK) :])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, seconds")
    ap.add_argument("--budget", type=float, default=510.0, help="seconds for the whole run (children stop early)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", help="comma-separated labels to run (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        CHILDREN[a.child](json.loads(Path(a.spec).read_text()))
        return 0
    t_end = time.monotonic() + a.budget
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    base = {
        "cuda": not a.dry_run,
        "shape": "tiny" if a.dry_run else "1b",
        "seq": 128 if a.dry_run else 2048,
        "batch": 2 if a.dry_run else 4,
        "steps": 3 if a.dry_run else 12,
        "warmup": 1 if a.dry_run else 4,
        "model_dir": str(work / "model"),
        "out": str(work / "hf"),
    }
    results: dict[str, Any] = {"dry_run": a.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    only = set(a.only.split(",")) if a.only else None
    for label, child, over, deadline in plan(a.dry_run):
        if only and label not in only and label not in ("env", "build_model"):
            continue
        if a.dry_run and label == "ladder_compile_regional":
            results[label] = {"status": "not run", "reason": "dry run: inductor on the CPU takes minutes"}
            continue
        left = t_end - time.monotonic()
        if left < 5:
            results[label] = {"status": "not run", "reason": "out of budget"}
            continue
        spec = {**base, **{k: v for k, v in over.items() if k != "env"}}
        env = dict(over.get("env", {}))
        if a.dry_run:
            env["KUBETUNE_FORCE_CPU"] = "1"
        results[label] = run_child(child, spec, min(deadline, left), env)
    ours, hf = results.get("ours_lora", {}), results.get("baseline_lora", {})
    if ours.get("tokens_per_s") and hf.get("tokens_per_s"):
        results["lora_speedup_vs_baseline"] = round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)
    results["wall_s"] = round(a.budget - (t_end - time.monotonic()), 1)
    text = json.dumps(results, indent=2, sort_keys=True)
    if a.out:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path[:0] = [str(REPO / p) for p in ("contract", "operator", "trainer", "hack")]
    sys.exit(main())
