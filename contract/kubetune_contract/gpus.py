"""What kubetune knows about a GPU type: its memory and its dense bf16 peak, by product name.

Names come in two spellings and both match: the device name (`torch.cuda.get_device_name`, NVML:
"NVIDIA H100 80GB HBM3") and the node label gpu-feature-discovery derives from it
(`nvidia.com/gpu.product`: "NVIDIA-H100-80GB-HBM3"). First match wins: specific names come first.
Pure; used by the trainer's MFU meter and by the right-sizing estimator.
"""

from __future__ import annotations

import re

GIB = 1024**3

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per GPU, from the vendors' datasheets.
# Override in the trainer: KUBETUNE_PEAK_FLOPS.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    (r"H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM (HBM3)
    (r"GH200", 989e12),
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L4\b", 121e12),
    # AWS's A10 variant (g5): NVIDIA publishes no sheet for it; the figure AWS partners quote is
    # 70 TFLOPS bf16 dense, below the A10's tensor peak (its FP32 is higher).
    (r"A10G", 70e12),
    (r"A10\b", 125e12),
    (r"T4\b", 65e12),  # fp16 only (no bf16)
    (r"V100", 125e12),
)

# Memory per GPU in GiB, as the driver reports it (nvidia-smi memory.total, MiB / 1024): a little
# under the datasheet's decimal GB, and what the CUDA context and every tensor must fit in.
# (pattern, GiB, canonical node-label value, source)
GPU_MEMORY: tuple[tuple[str, float, str, str], ...] = (
    # NVIDIA H200 datasheet: 141 GB HBM3e; the project's H200 test machine reports about 139 GiB.
    (r"H200", 139.0, "NVIDIA-H200", "NVIDIA H200 Tensor Core GPU datasheet (141 GB HBM3e)"),
    # H100 NVL: 94 GB HBM3 (nvidia-smi 95830 MiB).
    (r"H100.*NVL", 93.5, "NVIDIA-H100-NVL", "NVIDIA H100 datasheet (NVL: 94 GB)"),
    # H100 SXM5 and PCIe: 80 GB HBM3/HBM2e (nvidia-smi 81559 MiB).
    (r"H100", 79.6, "NVIDIA-H100-80GB-HBM3", "NVIDIA H100 Tensor Core GPU datasheet (80 GB)"),
    # A100 80GB SXM4/PCIe: 80 GB HBM2e (nvidia-smi 81920 MiB).
    (r"A100.*80\s*G", 80.0, "NVIDIA-A100-SXM4-80GB", "NVIDIA A100 Tensor Core GPU datasheet (80 GB HBM2e)"),
    # A100 40GB, and an A100 whose name does not say: the smaller one (40960 MiB).
    (r"A100", 40.0, "NVIDIA-A100-SXM4-40GB", "NVIDIA A100 Tensor Core GPU datasheet (40 GB HBM2)"),
    # L40S: 48 GB GDDR6 with ECC (nvidia-smi 46068 MiB).
    (r"L40S", 45.0, "NVIDIA-L40S", "NVIDIA L40S datasheet (48 GB GDDR6)"),
    # L4: 24 GB GDDR6 (nvidia-smi 23034 MiB).
    (r"L4\b", 22.5, "NVIDIA-L4", "NVIDIA L4 Tensor Core GPU datasheet (24 GB GDDR6)"),
    # A10G (AWS G5): 24 GB GDDR6 per GPU (AWS EC2 G5 instance page; nvidia-smi 23028 MiB).
    (r"A10G", 22.5, "NVIDIA-A10G", "AWS EC2 G5 instances (24 GB per A10G)"),
    (r"A10\b", 22.5, "NVIDIA-A10", "NVIDIA A10 Tensor Core GPU datasheet (24 GB GDDR6)"),
    # T4: 16 GB GDDR6 (nvidia-smi 15360 MiB).
    (r"T4\b", 15.0, "Tesla-T4", "NVIDIA T4 Tensor Core GPU datasheet (16 GB GDDR6)"),
)


def _first(patterns: list[str], name: str) -> int | None:
    for i, pattern in enumerate(patterns):
        if re.search(pattern, name, flags=re.I):
            return i
    return None


def peak_flops_for(gpu_name: str | None) -> float | None:
    """Dense bf16/fp16 peak FLOP/s of one GPU by its product name (device name or node label);
    None when the name is unknown (MFU and the time estimate are then absent, not wrong)."""
    if not gpu_name:
        return None
    i = _first([row[0] for row in PEAK_FLOPS], gpu_name)
    return None if i is None else PEAK_FLOPS[i][1]


def memory_gib_for(gpu_name: str | None) -> float | None:
    """Memory of one GPU in GiB by its product name; None when the name is unknown."""
    if not gpu_name:
        return None
    i = _first([row[0] for row in GPU_MEMORY], gpu_name)
    return None if i is None else GPU_MEMORY[i][1]


def known_gpu_types() -> list[tuple[str, float]]:
    """(node-label value, GiB) of every GPU type with a known memory size, smallest first."""
    return sorted(((label, gib) for _, gib, label, _ in GPU_MEMORY), key=lambda r: (r[1], r[0]))
