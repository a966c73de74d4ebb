"""Right-sizing before any GPU is requested: GPU memory per GPU, fits or not, advice, tokens,
GPU-hours and USD, from the base model's `config.json` and the job's training settings. Pure.

The operator runs it in preflight (status.estimate) and `kubetune estimate` prints it; the trainer
can use it to size gradient checkpointing. The memory model follows what this trainer does (see
kubetune_trainer.model): bytes per parameter by method, precision and ZeRO stage, activations per
micro-batch token, logits, and the CUDA context. It is an estimate (±15% against measured peaks is
the target), deliberately on the high side: a job refused here would have died with CUDA OOM.

Memory per GPU, in bytes (N parameters, T = batchSize × maxSeqLength tokens per micro-batch,
d = 2 under bf16/fp16, 4 under fp32; W = workers × GPUs per worker, the data-parallel world):
- weights: lora d·N (frozen base in the compute dtype); qlora ≈ 0.516·N_linear (nf4 with double
  quantisation: 4 bits + 8-bit absmax per 64 + fp32 per 256·64, QLoRA paper §3) + 4·N_rest
  (`prepare_model_for_kbit_training` upcasts embeddings, head and norms to fp32); full 4·N (fp32
  master weights, autocast computes) — under DeepSpeed the engine holds d·N, /W under ZeRO-3.
- trainable state per trainable parameter: fp32 param 4 + grad 4 + AdamW m, v 8 = 16 B;
  under DeepSpeed bf16 (ZeRO paper, Rajbhandari et al. 2020, §3): param 2 + grad 2 + optimizer 12
  (fp32 master, m, v); ZeRO-2 shards grads and optimizer over W, ZeRO-3 the params too; the
  -offload presets keep the optimizer (and under zero3-offload the params) in host memory.
- activations: a checkpointed layer keeps its input (d·h per token; nothing on the GPU under
  `offload`, which holds it in pinned host memory) and one layer's activations exist at a time
  during recompute; a layer that is not checkpointed keeps all of its own. `every n-th layer`
  checkpoints ⌈L/n⌉ of the L layers. `auto` is resolved against the GPU's memory by
  `resolve_checkpointing` (the cheapest setting that fits: never, every 4th, every 2nd, every
  layer, offloaded); unresolved (no capacity known) it counts as every layer, the high side. One layer of a
  Llama-shaped block (SDPA, no L² scores) keeps ≈ d·(7h + 3·kv + 4·i) + 16h bytes per token (the two
  RMSNorms compute in fp32), and each LoRA-adapted Linear adds its input again (d bytes, +1 for the
  dropout mask). Attention is padding-free (varlen over cu_seqlens): no L² mask or scores.
- logits: T·V·12 bytes (bf16 logits, the fp32 upcast for the loss, its gradient); with a fused
  linear cross-entropy (Liger) the logits are never materialised: ≈ T·h·12.
- overhead: CUDA context, cuBLAS workspaces and kernels ≈ 1 GiB, NCCL ≈ 0.5 GiB with W > 1, and 5%
  of the tensors for the caching allocator's fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from .config import LoraSpec, Method, TrainingSpec
from .gpus import GIB, known_gpu_types, memory_gib_for, peak_flops_for


class EstimateError(ValueError):
    """Input the estimator cannot use; `field` names what to fix (a config.json key or a spec field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# ---- the model's shape ---------------------------------------------------------------------

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + double-quantised absmax


@dataclass(frozen=True)
class ModelArch:
    """A Llama/Mistral/Qwen-shaped decoder (what `config.json` says)."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelArch:
        """From a Hugging Face `config.json` (dict). Raises EstimateError naming the missing key."""
        if not isinstance(cfg, dict):
            raise EstimateError("config.json", "expected a JSON object")
        if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            raise EstimateError("config.json", "mixture-of-experts models are not supported by the estimator")

        def need(key: str) -> int:
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise EstimateError(f"config.json {key}", f"needs a positive integer, got {v!r}")
            return v

        h, heads = need("hidden_size"), need("num_attention_heads")
        kv = need("num_key_value_heads") if cfg.get("num_key_value_heads") is not None else heads
        hd = need("head_dim") if cfg.get("head_dim") is not None else h // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden_size=h,
            intermediate_size=need("intermediate_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=kv,
            head_dim=hd,
            vocab_size=need("vocab_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or cfg.get("model_type") == "qwen2",
            o_bias=attention_bias,
        )

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each Linear of one layer, by module name."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears.values())

    @property
    def layer_params(self) -> int:
        return self.linear_params // self.layers + 2 * self.hidden_size

    @property
    def other_params(self) -> int:
        """Embeddings, the output head (unless tied), norms and biases: what 4-bit leaves alone."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = self.layers * ((q + 2 * kv) * self.qkv_bias + self.hidden_size * self.o_bias)
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embed + (2 * self.layers + 1) * self.hidden_size + bias

    @property
    def total_params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, lora: LoraSpec) -> int:
        """Adapter parameters: r·(in + out) per adapted Linear (all-linear: every one but the head)."""
        targets = self.lora_targets(lora)
        return self.layers * sum(lora.r * (a + b) for n, (a, b) in self.linears.items() if n in targets)

    def lora_targets(self, lora: LoraSpec) -> set[str]:
        names = {t.split(".")[-1] for t in lora.target_modules}
        if any(t.lower() == "all-linear" for t in lora.target_modules):
            return set(LINEAR_MODULES)
        return names & set(LINEAR_MODULES)


# ---- FLOPs (the trainer's MFU uses the same formula) ---------------------------------------


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    trainable_params: int
    layers: int
    hidden_size: int
    seq_len: float  # mean trained sequence length (tokens)

    @property
    def frozen_params(self) -> int:
        return max(0, self.total_params - self.trainable_params)


def attention_flops_per_token(layers: int, hidden_size: int, seq_len: float) -> float:
    return 12.0 * layers * hidden_size * seq_len


def flops_per_token(shape: ModelShape, method: str) -> float:
    """Model FLOPs to train on one token (forward + backward), PaLM's accounting:
    full 6·N + 12·L·H·S; LoRA/QLoRA 4·N_frozen + 6·N_trainable + 12·L·H·S (a frozen weight needs
    the activation gradient, not its own). Recompute of checkpointing is not counted."""
    attn = attention_flops_per_token(shape.layers, shape.hidden_size, shape.seq_len)
    if method == "full":
        return 6.0 * shape.total_params + attn
    return 4.0 * shape.frozen_params + 6.0 * shape.trainable_params + attn


# ---- the job ---------------------------------------------------------------------------------

ZERO_REDUCE_BUCKET = 200_000_000  # elements; reduce_bucket_size of kubetune_trainer/deepspeed/*.json
CUDA_CONTEXT_GIB = 1.0
NCCL_GIB = 0.5
FRAGMENTATION = 0.05
# Assumed model-FLOPs utilization band (low, high). 0.20: HF Trainer + PEFT class kernels with
# full recompute (≈ 18-28% on an H100, ../docs/benchmarks.md); 0.40: the project's goal with fused
# kernels. QLoRA dequantises every weight in every matmul: lower.
MFU_BAND: dict[str, tuple[float, float]] = {"lora": (0.20, 0.40), "full": (0.20, 0.40), "qlora": (0.12, 0.30)}


@dataclass(frozen=True)
class Plan:
    """What the estimator needs from a FineTuneJob (the fields advice may change)."""

    method: Method
    training: TrainingSpec
    lora: LoraSpec = field(default_factory=LoraSpec)
    gpus_per_worker: int = 0
    workers: int = 1
    gpu_type: str | None = None
    fused_cross_entropy: bool = False  # Liger's fused linear cross-entropy (training.liger resolved on)

    @property
    def world(self) -> int:
        return self.workers * max(1, self.gpus_per_worker)

    @property
    def precision_bytes(self) -> int:
        p = self.training.precision
        if p == "fp32" or (p == "auto" and self.gpus_per_worker == 0):
            return 4
        return 2

    @property
    def zero_stage(self) -> int:
        ds = self.training.deepspeed
        return 0 if ds == "none" else int(ds[4])

    @property
    def offload(self) -> bool:
        return self.training.deepspeed.endswith("-offload")

    def with_training(self, **update: Any) -> Plan:
        return replace(self, training=self.training.model_copy(update=update))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def gib(self) -> dict[str, float]:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
        return {p: round(getattr(self, p) / GIB, 2) for p in parts}


def layer_activation_bytes(arch: ModelArch, plan: Plan) -> float:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    d, h = plan.precision_bytes, arch.hidden_size
    q, kv, i = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.intermediate_size
    base = d * (4 * h + q + 2 * kv + q + kv + q + 4 * i) + 16 * h
    if plan.method == "full":
        return base
    per_input = d + (1 if plan.lora.dropout > 0 else 0)
    targets = arch.lora_targets(plan.lora)
    return base + sum(per_input * a for n, (a, _) in arch.linears.items() if n in targets)


def memory(arch: ModelArch, plan: Plan) -> Memory:
    """GPU memory per GPU of one training process (a CPU job: the process's memory)."""
    d, w, zero, t = plan.precision_bytes, plan.world, plan.zero_stage, plan.training
    n_total = arch.total_params
    n_train = n_total if plan.method == "full" else arch.lora_params(plan.lora)
    n_frozen = n_total - n_train

    # Weights and trainable state.
    if zero:
        # The engine casts the module to the compute dtype and keeps an fp32 master copy.
        master = 4 if d == 2 else 0
        shard_params = w if zero == 3 else 1
        frozen = n_frozen * (NF4_BYTES_PER_PARAM if plan.method == "qlora" else d)
        weights = 0.0 if zero == 3 and plan.offload else (frozen + n_train * d) / shard_params
        gradients = n_train * d / (w if zero >= 2 else 1)
        optimizer = 0.0 if plan.offload else n_train * (master + 8) / w
        gradients = min(gradients, 2 * ZERO_REDUCE_BUCKET * d) if plan.offload else gradients
        gradients += 2 * min(ZERO_REDUCE_BUCKET, n_train) * d  # reduce / all-gather buckets
        if zero == 3:  # gathered parameters: the layer computing, the one prefetched, or the embedding
            weights += d * max(2 * arch.layer_params, arch.vocab_size * arch.hidden_size)
    else:
        if plan.method == "qlora":
            weights = arch.linear_params * NF4_BYTES_PER_PARAM + arch.other_params * 4.0
        elif plan.method == "lora":
            weights = n_frozen * d
        else:
            weights = 0.0
        weights += n_train * 4.0  # fp32 adapters, or the fp32 master weights of full fine-tuning
        gradients = n_train * 4.0 * (2 if w > 1 else 1)  # DDP's buckets hold a second copy
        optimizer = n_train * 8.0  # AdamW exp_avg + exp_avg_sq, fp32

    # Activations and logits of one micro-batch.
    tokens = t.batch_size * t.max_seq_length
    per_layer = layer_activation_bytes(arch, plan)
    mode, every = checkpointing(t)
    if mode == "never":
        acts = tokens * arch.layers * per_layer
    else:
        ck = math.ceil(arch.layers / every)  # layers 0, n, 2n, ... are checkpointed
        kept = 0 if mode == "offload" else ck * d * arch.hidden_size
        acts = tokens * (kept + (arch.layers - ck) * per_layer + per_layer)
    acts += tokens * arch.hidden_size * 4 * 2  # the gradient flowing down the residual stream, fp32
    if plan.method == "full" and not zero and d == 2:
        acts += n_total * d  # autocast's bf16 copy of each fp32 weight, alive from forward to backward
    width = arch.hidden_size if plan.fused_cross_entropy else arch.vocab_size
    logits = tokens * width * 12.0

    tensors = weights + gradients + optimizer + acts + logits
    overhead = (CUDA_CONTEXT_GIB + (NCCL_GIB if w > 1 else 0.0)) * GIB + FRAGMENTATION * tensors
    return Memory(weights, gradients, optimizer, acts, logits, overhead)


def checkpointing(t: TrainingSpec) -> tuple[str, int]:
    """(mode, every n-th layer) as `memory` counts it: an unresolved auto counts as every layer."""
    mode = "always" if t.gradient_checkpointing == "auto" else t.gradient_checkpointing
    return mode, t.gradient_checkpointing_every_n_layers or 1


AUTO_HEADROOM = 0.9  # auto picks a setting whose estimate leaves 10% of the GPU free (the estimate is ±15%)
# auto's candidates, cheapest in compute first: (mode, every n-th layer)
AUTO_CHECKPOINTING: tuple[tuple[str, int | None], ...] = (
    ("never", None),
    ("always", 4),
    ("always", 2),
    ("always", None),
    ("offload", None),
)


def resolve_checkpointing(arch: ModelArch, plan: Plan, capacity_gib: float | None) -> Plan:
    """The plan with `gradientCheckpointing: auto` replaced by what the trainer will run: never on
    CPU (capacity None with no GPUs), else the first of AUTO_CHECKPOINTING within AUTO_HEADROOM of capacity_gib,
    or every layer when none does (the estimate then says it does not fit). Other modes unchanged."""
    t = plan.training
    if t.gradient_checkpointing != "auto":
        return plan
    if plan.gpus_per_worker == 0:
        return plan.with_training(gradient_checkpointing="never")
    if capacity_gib is None:
        return plan.with_training(gradient_checkpointing="always")
    for mode, every in AUTO_CHECKPOINTING:
        cand = plan.with_training(gradient_checkpointing=mode, gradient_checkpointing_every_n_layers=every)
        if _fits(arch, cand, capacity_gib * AUTO_HEADROOM)[0]:
            return cand
    return plan.with_training(gradient_checkpointing="always", gradient_checkpointing_every_n_layers=None)


def host_gib(arch: ModelArch, plan: Plan) -> float:
    """Host memory the -offload presets need per worker: fp32 master, m and v (and a 16-bit copy of
    the parameters under zero3-offload) of this worker's share, pinned."""
    n_train = arch.total_params if plan.method == "full" else arch.lora_params(plan.lora)
    share = n_train * 16 / plan.workers
    return share / GIB


def _fits(arch: ModelArch, plan: Plan, capacity_gib: float) -> tuple[bool, float]:
    gib = memory(arch, plan).total / GIB
    return gib <= capacity_gib, gib


def advise(arch: ModelArch, plan: Plan, capacity_gib: float) -> list[dict[str, Any]]:
    """Changes to the spec that make the job fit, each with the field to change and the memory it
    would need; the cheapest kinds of change first. Empty when it fits already."""
    if _fits(arch, plan, capacity_gib)[0]:
        return []
    out: list[dict[str, Any]] = []
    t = plan.training

    def offer(candidate: Plan, fields: dict[str, Any], why: str, capacity: float = capacity_gib) -> bool:
        ok, gib = _fits(arch, candidate, capacity)
        if ok:
            out.append({"fields": fields, "gpuMemoryGiB": round(gib, 1), "message": why})
        return ok

    if t.gradient_checkpointing == "never":
        offer(
            resolve_checkpointing(arch, plan.with_training(gradient_checkpointing="auto"), capacity_gib),
            {"training.gradientCheckpointing": "auto"},
            "recompute activations in backward (as few layers as fit) instead of keeping every layer's",
        )
    b = t.batch_size // 2
    while b >= 1:
        ga = t.gradient_accumulation_steps * math.ceil(t.batch_size / b)
        if offer(
            plan.with_training(batch_size=b, gradient_accumulation_steps=ga),
            {"training.batchSize": b, "training.gradientAccumulationSteps": ga},
            "a smaller micro-batch, the same sequences per optimizer step",
        ):
            break
        b //= 2
    presets = ["zero2", "zero3", "zero2-offload", "zero3-offload"] if plan.gpus_per_worker else []
    if plan.method == "qlora":
        presets = [p for p in presets if not p.startswith("zero3")]  # refused at admission
    for preset in presets:
        if preset != t.deepspeed and offer(
            plan.with_training(deepspeed=preset),
            {"training.deepspeed": preset},
            (
                f"DeepSpeed {preset} keeps the optimizer state in host memory (about {host_gib(arch, plan):.0f} GiB: "
                "resources.memory)"
                if preset.endswith("offload")
                else f"DeepSpeed {preset} shards the trainable state across the {plan.world} GPU(s)"
            ),
        ):
            break
    if plan.method == "lora" and not t.deepspeed.startswith("zero3"):
        offer(replace(plan, method="qlora"), {"method": "qlora"}, "a 4-bit (nf4) frozen base, about 4x smaller")
    if plan.gpus_per_worker:
        preset = "zero2" if plan.method == "qlora" else "zero3"
        for gpus in range(plan.gpus_per_worker + 1, 9):
            cand = replace(plan, gpus_per_worker=gpus).with_training(deepspeed=preset)
            if offer(
                cand,
                {"resources.gpus": gpus, "training.deepspeed": preset},
                f"{gpus * plan.workers} GPUs in all with DeepSpeed {preset} sharding across them",
            ):
                break
    for label, gib in known_gpu_types():
        if gib > capacity_gib and offer(
            replace(plan, gpu_type=label), {"resources.gpuType": label}, f"a GPU with {gib:g} GiB", gib
        ):
            break
    return out


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def estimate(
    arch: ModelArch,
    plan: Plan,
    *,
    price_per_gpu_hour: tuple[float, float] | None = None,
    dataset_tokens: int | None = None,
) -> dict[str, Any]:
    """The whole estimate as JSON-ready camelCase fields (status.estimate, `kubetune estimate`).

    price_per_gpu_hour: (low, high) USD per GPU-hour (spot..on-demand) from the operator's table.
    dataset_tokens: tokens in one epoch, needed when the job gives epochs rather than maxSteps."""
    notes: list[str] = []
    capacity = memory_gib_for(plan.gpu_type) if plan.gpus_per_worker else None
    plan = resolve_checkpointing(arch, plan, capacity)
    t = plan.training
    mem = memory(arch, plan)
    gib = mem.total / GIB
    fits: bool | None = None
    advice: list[dict[str, Any]] = []
    if plan.gpus_per_worker == 0:
        notes.append("CPU job: memory is the process's host memory; no GPU to fit")
    elif plan.gpu_type is None or capacity is None:
        why = "no resources.gpuType" if plan.gpu_type is None else f"GPU type {plan.gpu_type!r} is not in the table"
        notes.append(f"fit unknown: {why}; known: {', '.join(label for label, _ in known_gpu_types())}")
        for label, cap in known_gpu_types():
            if gib <= cap:
                advice.append(
                    {
                        "fields": {"resources.gpuType": label},
                        "gpuMemoryGiB": round(gib, 1),
                        "message": f"the smallest known GPU that fits ({cap:g} GiB)",
                    }
                )
                break
    else:
        fits = gib <= capacity
        advice = advise(arch, plan, capacity)
        if not fits and not advice:
            notes.append("no single change makes it fit: combine them (more GPUs with ZeRO-3, qlora, smaller batch)")
    if not plan.fused_cross_entropy and mem.logits > 0.25 * mem.total:
        fused = memory(arch, replace(plan, fused_cross_entropy=True))
        notes.append(
            f"logits take {mem.logits / GIB:.1f} GiB; a fused cross-entropy would need {fused.logits / GIB:.2f}"
        )

    tokens_per_step = t.batch_size * t.gradient_accumulation_steps * t.max_seq_length * plan.world
    steps: int | None = t.max_steps
    if steps is None and t.epochs is not None:
        if dataset_tokens:
            steps = max(1, math.ceil(t.epochs * dataset_tokens / tokens_per_step))
        else:
            notes.append("training.epochs without the dataset's size: give its tokens for a time estimate")
    tokens = None if steps is None else steps * tokens_per_step
    if not t.packing:
        notes.append("training.packing false: tokens are an upper bound (sequences shorter than maxSeqLength)")

    n_train = arch.total_params if plan.method == "full" else arch.lora_params(plan.lora)
    shape = ModelShape(arch.total_params, n_train, arch.layers, arch.hidden_size, float(t.max_seq_length))
    fpt = flops_per_token(shape, plan.method)
    peak = peak_flops_for(plan.gpu_type) if plan.gpus_per_worker else None
    band = MFU_BAND[plan.method]
    hours: dict[str, float] | None = None
    usd: dict[str, str] | None = None
    if tokens is not None and peak:
        # GPU-seconds = FLOPs ÷ (per-GPU peak × MFU), summed over GPUs; low at the high MFU.
        hours = {"low": tokens * fpt / (peak * band[1]) / 3600, "high": tokens * fpt / (peak * band[0]) / 3600}
        if price_per_gpu_hour is not None:
            lo, hi = price_per_gpu_hour
            usd = {"low": f"{hours['low'] * lo:.2f}", "high": f"{hours['high'] * hi:.2f}"}
    elif tokens is not None and plan.gpus_per_worker:
        notes.append("no known peak FLOP/s for this GPU type: no time or cost estimate")
    return {
        "gpuMemoryGiB": round(gib, 1),
        "gpuCapacityGiB": capacity,
        "fits": fits,
        "advice": advice,
        "breakdownGiB": mem.gib(),
        "gradientCheckpointing": {
            "mode": checkpointing(t)[0],
            "everyNLayers": checkpointing(t)[1],
        },
        "parameters": {"total": arch.total_params, "trainable": n_train},
        "tokensToTrain": tokens,
        "flopsPerToken": float(f"{fpt:.4g}"),
        "mfuBand": list(band),
        "estimatedGpuHours": None if hours is None else {k: _round(v) for k, v in hours.items()},
        "estimatedWallHours": None if hours is None else {k: _round(v / plan.world) for k, v in hours.items()},
        "estimatedUsd": usd,
        "notes": notes,
    }
