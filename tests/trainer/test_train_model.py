"""Methods: LoRA trains only adapter parameters; full trains all; QLoRA/fp16/DeepSpeed refuse CPU."""

import pytest
import torch

from kubetune_contract.config import TrainerConfig
from kubetune_dev.trainer_inputs import trainer_config
from kubetune_trainer import model as M
from kubetune_trainer import zero
from kubetune_trainer.errors import UserError


def _cfg(tiny_model_dir, **kw):
    return TrainerConfig.model_validate(
        trainer_config(
            bucket="bucket-x", endpoint="http://127.0.0.1:1", model_dir=tiny_model_dir, data_uri="/nonexistent", **kw
        )
    )


def test_lora_trains_only_adapter_parameters(tiny_model_dir):
    cfg = _cfg(
        tiny_model_dir,
        lora={"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
        training={"gradientCheckpointing": "always"},
    )
    prec = M.resolve_precision("auto", cuda=False)
    assert prec.name == "fp32"
    model = M.load_model(str(tiny_model_dir), cfg, prec, torch.device("cpu"))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    n_trainable = sum(p.numel() for p in trainable.values())
    assert (n_trainable, sum(p.numel() for p in model.parameters())) == tuple(model.get_nb_trainable_parameters())
    assert M.trainable_parameters(model) == tuple(model.get_nb_trainable_parameters())
    # all-linear: every projection of both layers, never the output head
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in trainable)
    # expected count: r * (in + out) per adapted linear
    base = M.unwrap(model).get_base_model()
    wrapped = [m.base_layer for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in adapted]
    assert len(wrapped) == 2 * 7
    expect = sum(4 * (m.in_features + m.out_features) for m in wrapped)
    assert n_trainable == expect
    # a backward pass leaves the base weights without gradients
    ids = torch.randint(4, 100, (2, 12))
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in trainable.values())


def test_lora_named_targets(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, lora={"r": 2, "targetModules": ["q_proj", "v_proj"]})
    model = M.load_model(str(tiny_model_dir), cfg, M.resolve_precision("fp32", False), torch.device("cpu"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    bad = _cfg(tiny_model_dir, lora={"targetModules": ["no_such_module"]})
    with pytest.raises(UserError, match="lora.targetModules"):
        M.load_model(str(tiny_model_dir), bad, M.resolve_precision("fp32", False), torch.device("cpu"))


def test_full_fine_tuning_trains_everything(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, method="full")
    model = M.load_model(str(tiny_model_dir), cfg, M.resolve_precision("auto", False), torch.device("cpu"))
    t, total = M.trainable_parameters(model)
    assert t == total and next(model.parameters()).dtype == torch.float32


def test_gpu_only_features_fail_clearly_on_cpu(tiny_model_dir):
    with pytest.raises(UserError, match="qlora needs a GPU"):
        M.check_method_supported(_cfg(tiny_model_dir, method="qlora"), cuda=False)
    ds = _cfg(tiny_model_dir, training={"deepspeed": "zero2"})
    with pytest.raises(UserError, match="deepspeed=zero2 needs GPUs"):
        zero.check_supported(ds, cuda=False, force_cpu=False)
    zero.check_supported(ds, cuda=False, force_cpu=True)  # the explicit knob: DeepSpeed on the CPU
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        M.resolve_precision("fp16", cuda=False)
    assert M.resolve_precision("bf16", cuda=False).name == "bf16"


@pytest.mark.parametrize("preset", zero.PRESETS)
def test_deepspeed_presets_are_complete(tiny_model_dir, preset):
    cfg = _cfg(tiny_model_dir, training={"deepspeed": preset, "batchSize": 3, "gradientAccumulationSteps": 5})
    ds = zero.config(cfg, M.Precision("bf16", torch.bfloat16, True))
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "auto" not in str(ds)
    stage = ds["zero_optimization"]["stage"]
    assert stage == (3 if preset.startswith("zero3") else 2)
    assert ("offload_optimizer" in ds["zero_optimization"]) == preset.endswith("offload")
    # no op compiled at run time: torch's AdamW, also over offloaded partitions (not DeepSpeedCPUAdam)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not preset.endswith("offload")
