"""`kubetune`: the user's command line. `kubetune estimate -f finetunejob.yaml [--model-config config.json]`
prints the right-sizing estimate (kubetune_contract.estimate) of a FineTuneJob as JSON: GPU memory
per GPU, whether it fits the job's GPU type, advice when it does not, tokens, GPU-hours and USD at
the operator's price table (KUBETUNE_GPU_PRICES overrides it, as for the operator).

No network: the model's shape comes from --model-config, else from a local directory named by
baseModel.uri, else from the Hugging Face cache (HF_HOME). Bad input exits 2 naming the file and
field; the estimate itself exits 0 whether the job fits or not (read `fits`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune_contract.estimate import EstimateError, ModelArch, Plan, estimate

from .api import KIND, FineTuneJobSpec
from .cost import gpu_hour_prices
from .settings import Settings


class InputError(Exception):
    """Input a user must fix; the message names the file and the field."""


def read_job(path: str) -> FineTuneJobSpec:
    """The spec of the FineTuneJob in `path` (the first one of a multi-document file, or a bare spec)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not YAML: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if jobs:
        spec = jobs[0].get("spec")
    elif len(docs) == 1 and isinstance(docs[0], dict) and "kind" not in docs[0]:
        spec = docs[0]
    else:
        raise InputError(f"{path}: no {KIND} in it")
    if not isinstance(spec, dict):
        raise InputError(f"{path}: spec: expected a mapping")
    try:
        return FineTuneJobSpec.model_validate(spec)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise InputError(f"{path}: spec.{where}: {err['msg']}") from None


def _hf_cache_config(model_id: str) -> Path | None:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    snapshots = home / "hub" / f"models--{model_id.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def find_model_config(spec: FineTuneJobSpec, given: str | None) -> Path:
    if given:
        return Path(given)
    uri = spec.base_model.uri
    local = Path(uri) / "config.json"
    if local.is_file():
        return local
    cached = None if "://" in uri else _hf_cache_config(uri)
    if cached is not None:
        return cached
    raise InputError(
        f"spec.baseModel.uri: no config.json for {uri} here (not a local directory, not in the Hugging Face cache); "
        "pass --model-config path/to/config.json"
    )


def read_model_config(path: Path) -> ModelArch:
    try:
        cfg = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON: {e}") from None
    try:
        return ModelArch.from_config(cfg)
    except EstimateError as e:
        raise InputError(f"{path}: {e}") from None


def run_estimate(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    spec = read_job(args.file)
    arch = read_model_config(find_model_config(spec, args.model_config))
    r = spec.resources
    gpu_type = args.gpu_type or r.gpu_type
    plan = Plan(
        method=spec.method,
        training=spec.training,
        lora=spec.lora,
        gpus_per_worker=r.gpus,
        workers=r.workers,
        gpu_type=gpu_type,
        fused_cross_entropy=args.fused_cross_entropy,
    )
    prices = gpu_hour_prices(settings, gpu_type, spec.capacity.policy) if r.gpus else None
    out = estimate(arch, plan, price_per_gpu_hour=prices, dataset_tokens=args.dataset_tokens)
    out["gpuType"] = gpu_type
    out["usdPerGpuHour"] = None if prices is None else list(prices)
    return out


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune", description="kubetune command line")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("estimate", help="GPU memory, fit, GPU-hours and USD of a FineTuneJob, before it runs")
    e.add_argument("-f", "--file", required=True, help="the FineTuneJob YAML")
    e.add_argument("--model-config", help="the base model's config.json (default: found locally, no download)")
    e.add_argument("--gpu-type", help="estimate for this GPU type instead of spec.resources.gpuType")
    e.add_argument(
        "--dataset-tokens", type=_positive_int, help="tokens in one epoch (for jobs that give training.epochs)"
    )
    e.add_argument(
        "--fused-cross-entropy", action="store_true", help="assume a fused linear cross-entropy (no logits in memory)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except (ValidationError, ValueError) as e:
        print(f"kubetune: KUBETUNE_* settings: {e}", file=sys.stderr)
        return 2
    try:
        out = run_estimate(args, settings)
    except InputError as e:
        print(f"kubetune estimate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
