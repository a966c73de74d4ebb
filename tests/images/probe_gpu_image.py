"""Runs INSIDE the GPU trainer image (tests/images/test_gpu_image.py mounts it): what a CPU machine can
tell of the GPU path. Prints one JSON object; never reaches the network.

- the GPU packages import, at their pins; DeepSpeed was built with no prebuilt op
- every DeepSpeed preset the trainer ships initialises a real engine (CPU accelerator, gloo) with
  torch's AdamW, while any op load/JIT compile raises: no preset needs nvcc or g++ at run time
- Triton's own build path (the one its CUDA launcher takes) compiles and loads a Python C extension
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata, resources

out: dict = {"uid": os.getuid(), "python": sys.version.split()[0]}
out["versions"] = {
    p: metadata.version(p)
    for p in ("torch", "triton", "bitsandbytes", "deepspeed", "liger-kernel", "nvidia-ml-py", "datasets")
}

import bitsandbytes  # noqa: E402,F401
import datasets  # noqa: E402,F401
import liger_kernel.transformers  # noqa: E402,F401
import pynvml  # noqa: E402,F401

out["imports"] = "ok"

os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
import deepspeed  # noqa: E402
import deepspeed.git_version_info as dsinfo  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.ops.op_builder.builder import OpBuilder  # noqa: E402

out["deepspeed_prebuilt_ops"] = sorted(k for k, v in dsinfo.installed_ops.items() if v)
loads: list[str] = []


def _trap(self, *a, **k):
    if self.name == "deepspeed_shm_comm":
        # the CPU accelerator's (this probe's, not a GPU pod's: CUDA uses NCCL) shared-memory comm op
        # for collectives; DeepSpeed runs without it when it is None
        return None
    loads.append(self.name)
    raise RuntimeError(f"DeepSpeed op {self.name} would be loaded/JIT-compiled")


OpBuilder.load = _trap  # type: ignore[method-assign]
OpBuilder.jit_load = _trap  # type: ignore[method-assign]

AUTO = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "lr": 1e-3,
    "weight_decay": 0.0,
}


def _fill(d):
    if isinstance(d, dict):
        return {k: AUTO.get(k, None) if v == "auto" else _fill(v) for k, v in d.items() if v != "auto" or k in AUTO}
    return d


dist.init_process_group("gloo", init_method=f"file://{os.environ['TMPDIR']}/pg", rank=0, world_size=1)
engines = {}
for name in ("zero2", "zero2-offload", "zero3", "zero3-offload"):
    cfg = _fill(json.loads(resources.files("kubetune_trainer").joinpath("deepspeed", f"{name}.json").read_text()))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    try:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        loss = engine(torch.randn(4, 16)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        engines[name] = {
            "basic_optimizer": type(engine.basic_optimizer).__module__ + "." + type(engine.basic_optimizer).__name__,
            "loss": float(loss),
        }
        engine.destroy()
    except Exception as e:  # reported, the test shows it
        engines[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
out["deepspeed_engines"] = engines
out["deepspeed_op_loads"] = loads

from triton.runtime.build import compile_module_from_src  # noqa: E402

SRC = r"""
#include <Python.h>
static PyObject *answer(PyObject *self, PyObject *args) { return PyLong_FromLong(42); }
static PyMethodDef M[] = {{"answer", answer, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef D = {PyModuleDef_HEAD_INIT, "kubetune_probe", NULL, -1, M};
PyMODINIT_FUNC PyInit_kubetune_probe(void) { return PyModule_Create(&D); }
"""
try:
    out["triton_c_build"] = compile_module_from_src(SRC, "kubetune_probe").answer()
except Exception as e:
    out["triton_c_build"] = f"{type(e).__name__}: {e}"[:500]
print("PROBE " + json.dumps(out))
