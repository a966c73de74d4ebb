"""The right-sizing estimator (kubetune_contract.estimate) and `kubetune estimate`.

Model shapes are the published config.json values, written here (no downloads). Parameter counts
are the ones the model cards and PEFT print; memory bounds are wide enough for an estimate and tight
enough to catch a wrong bytes-per-parameter."""

import json
from dataclasses import replace

import pytest
import yaml

from kubetune_contract.config import LoraSpec, TrainingSpec
from kubetune_contract.estimate import AUTO_CHECKPOINTING, EstimateError, ModelArch, Plan, estimate, memory
from kubetune_contract.gpus import GIB, memory_gib_for, peak_flops_for
from kubetune_dev.model_shapes import LLAMA3_8B
from kubetune_operator import cli
from kubetune_trainer import mfu

MISTRAL_7B = LLAMA3_8B | {"model_type": "mistral", "vocab_size": 32000}
QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
H100, A10G, L4 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-A10G", "NVIDIA-L4"
ARCH = ModelArch.from_config(LLAMA3_8B)


def plan(method="lora", gpus=1, workers=1, gpu_type=H100, **training) -> Plan:
    training.setdefault("max_steps", 1000)
    return Plan(method, TrainingSpec(**training), LoraSpec(), gpus, workers, gpu_type)


def gib(p: Plan) -> float:
    return memory(ARCH, p).total / GIB


def test_parameter_counts_match_the_published_models():
    assert ARCH.total_params == 8_030_261_248  # Llama-3-8B
    assert ARCH.lora_params(LoraSpec(r=16)) == 41_943_040  # what PEFT prints for r=16, all-linear
    assert ModelArch.from_config(MISTRAL_7B).total_params == 7_241_732_096
    qwen = ModelArch.from_config(QWEN25_05B)  # tied embeddings, q/k/v biases
    assert qwen.total_params == 494_032_768
    only_qv = ARCH.lora_params(LoraSpec(r=8, target_modules=["q_proj", "v_proj"]))
    assert only_qv == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_lora_8b_bf16_keeps_15_gib_of_weights_and_fits_one_h100():
    e = estimate(ARCH, plan(batch_size=4, max_seq_length=2048, precision="bf16", gradient_checkpointing="always"))
    assert 14.8 <= e["breakdownGiB"]["weights"] <= 15.2  # 8.03e9 × 2 B + 42M fp32 adapters
    assert e["breakdownGiB"]["optimizer"] == pytest.approx(41_943_040 * 8 / GIB, abs=0.01)
    assert e["fits"] is True and e["advice"] == [] and 25 < e["gpuMemoryGiB"] < 45
    # Llama-3's 128k vocabulary: the logits of 8k tokens outweigh every other activation.
    assert e["breakdownGiB"]["logits"] > 10 and any("fused cross-entropy" in n for n in e["notes"])
    fused = memory(ARCH, replace(plan(batch_size=4, max_seq_length=2048), fused_cross_entropy=True))
    assert fused.logits / GIB < 0.5


def test_qlora_8b_fits_a_24_gb_gpu():
    for gpu in (A10G, L4):
        e = estimate(ARCH, plan("qlora", gpu_type=gpu, batch_size=1, max_seq_length=2048))
        assert e["fits"] is True, e
        assert e["gpuCapacityGiB"] == 22.5 and e["gpuMemoryGiB"] < 20
    # nf4 linears (≈ 3.4 GiB) + embeddings and head upcast to fp32 (≈ 3.9 GiB) + adapters
    assert 6.5 < memory(ARCH, plan("qlora", gpu_type=L4)).weights / GIB < 8.0


def test_a_qlora_job_too_big_for_an_l4_is_told_which_fields_to_change():
    big = plan("qlora", gpu_type=L4, batch_size=4, gradient_accumulation_steps=8, max_seq_length=4096)
    e = estimate(ARCH, big)
    assert e["fits"] is False and e["gpuMemoryGiB"] > 30
    fields = [a["fields"] for a in e["advice"]]
    smaller = next(f for f in fields if "training.batchSize" in f)
    assert smaller["training.batchSize"] * smaller["training.gradientAccumulationSteps"] == 4 * 8  # same step
    assert not any(str(f.get("training.deepspeed", "")).startswith("zero3") for f in fields)  # refused with qlora
    b, ga = smaller["training.batchSize"], smaller["training.gradientAccumulationSteps"]
    advised = big.with_training(batch_size=b, gradient_accumulation_steps=ga)
    assert estimate(ARCH, advised)["fits"] is True
    assert any(f.get("resources.gpuType") for f in fields)  # or a bigger GPU


def test_full_fine_tuning_of_8b_needs_zero3_across_8_gpus():
    one = plan("full", batch_size=1, max_seq_length=2048)
    e = estimate(ARCH, one)
    assert e["fits"] is False and e["gpuMemoryGiB"] > 120  # 16 B/param of fp32 weights, grads, AdamW
    assert any(a["fields"].get("training.deepspeed") == "zero3" for a in e["advice"])
    for gpus, workers in ((8, 1), (1, 8)):  # 8 GPUs in one pod, or 8 pods of one
        z3 = plan("full", gpus=gpus, workers=workers, batch_size=1, max_seq_length=2048, deepspeed="zero3")
        z = estimate(ARCH, z3)
        assert z["fits"] is True and z["gpuMemoryGiB"] < 40, z
        assert z["breakdownGiB"]["optimizer"] == pytest.approx(ARCH.total_params * 12 / 8 / GIB, abs=0.01)
    z2 = gib(plan("full", gpus=8, batch_size=1, max_seq_length=2048, deepspeed="zero2"))
    assert gib(plan("full", gpus=8, batch_size=1, max_seq_length=2048, deepspeed="zero3")) < z2


def test_gradient_checkpointing_off_keeps_every_layers_activations():
    on = memory(ARCH, plan(batch_size=4, max_seq_length=2048, gradient_checkpointing="always"))
    off = memory(ARCH, plan(batch_size=4, max_seq_length=2048, gradient_checkpointing="never"))
    assert off.activations > 10 * on.activations
    e = estimate(ARCH, plan(batch_size=4, max_seq_length=2048, gradient_checkpointing="never"))
    assert e["fits"] is False
    assert e["advice"][0]["fields"] == {"training.gradientCheckpointing": "auto"}


def test_checkpointing_every_n_layers_and_offload_sit_between_always_and_never():
    acts = {
        (mode, n): memory(
            ARCH,
            plan(
                batch_size=4, max_seq_length=2048, gradient_checkpointing=mode, gradient_checkpointing_every_n_layers=n
            ),
        ).activations
        for mode, n in (("never", None), ("always", 4), ("always", 2), ("always", None), ("offload", None))
    }
    order = [acts[k] for k in (("never", None), ("always", 4), ("always", 2), ("always", None), ("offload", None))]
    assert order == sorted(order, reverse=True)
    assert (
        acts[("always", None)] == memory(ARCH, plan(batch_size=4, max_seq_length=2048)).activations
    )  # auto, unresolved


def test_auto_checkpointing_is_the_cheapest_setting_that_fits():
    # the 8B LoRA at 4 x 2048 on an 80 GiB GPU: never does not fit, a checkpointed setting does
    job = plan(batch_size=4, max_seq_length=2048)
    e = estimate(ARCH, job)
    assert e["fits"] is True and e["gradientCheckpointing"]["mode"] in ("always", "offload")
    assert estimate(ARCH, plan(batch_size=1, max_seq_length=256))["gradientCheckpointing"] == {
        "mode": "never",
        "everyNLayers": 1,
    }
    assert estimate(ARCH, plan(gpus=0, batch_size=4, max_seq_length=2048))["gradientCheckpointing"]["mode"] == "never"
    for mode, n in AUTO_CHECKPOINTING:  # what auto picked is the first candidate that fits
        cand = job.with_training(gradient_checkpointing=mode, gradient_checkpointing_every_n_layers=n)
        if memory(ARCH, cand).total / GIB <= 0.9 * memory_gib_for(H100):
            assert e["gradientCheckpointing"] == {"mode": mode, "everyNLayers": n or 1}
            break


def test_without_a_known_gpu_type_the_fit_is_unknown_and_the_smallest_fitting_type_is_named():
    e = estimate(ARCH, plan("qlora", gpu_type=None, batch_size=1, max_seq_length=2048))
    assert e["fits"] is None and e["gpuCapacityGiB"] is None
    assert e["advice"][0]["fields"] == {"resources.gpuType": "Tesla-T4"}  # 15 GiB is enough
    assert e["estimatedGpuHours"] is None and any("resources.gpuType" in n for n in e["notes"])
    odd = estimate(ARCH, plan(gpu_type="NVIDIA-GeForce-RTX-4090"))
    assert odd["fits"] is None and odd["estimatedUsd"] is None  # absent, not wrong


def test_tokens_gpu_hours_and_usd_follow_from_the_flops():
    p = plan(gpus=2, workers=2, max_steps=500, batch_size=2, gradient_accumulation_steps=4, max_seq_length=2048)
    e = estimate(ARCH, p, price_per_gpu_hour=(2.5, 6.98))
    tokens = 500 * 2 * 4 * 2048 * 4
    assert e["tokensToTrain"] == tokens
    fpt = mfu.flops_per_token(mfu.ModelShape(ARCH.total_params, 41_943_040, 32, 4096, 2048.0), "lora")
    assert e["flopsPerToken"] == pytest.approx(fpt, rel=1e-3)
    assert 4 * 8.03e9 < fpt < 4 * 8.03e9 + 6 * 42e6 + 3.3e9  # 4N frozen + 6N adapters + attention
    low, high = tokens * fpt / (989e12 * 0.40) / 3600, tokens * fpt / (989e12 * 0.20) / 3600
    assert e["estimatedGpuHours"] == {"low": round(low, 2), "high": round(high, 2)}
    assert e["estimatedWallHours"]["high"] == round(high / 4, 2)
    assert e["estimatedUsd"] == {"low": f"{low * 2.5:.2f}", "high": f"{high * 6.98:.2f}"}
    by_epochs = plan(max_steps=None, epochs=2, batch_size=4, max_seq_length=1024)
    assert estimate(ARCH, by_epochs)["tokensToTrain"] is None
    assert estimate(ARCH, by_epochs, dataset_tokens=10_000_000)["tokensToTrain"] == 4883 * 4096


def test_gpu_tables_know_both_spellings_of_a_gpu():
    assert memory_gib_for("NVIDIA-A100-SXM4-80GB") == memory_gib_for("NVIDIA A100 80GB PCIe") == 80.0
    assert memory_gib_for("NVIDIA-A100-SXM4-40GB") == 40.0 and memory_gib_for("NVIDIA-L40S") == 45.0
    assert memory_gib_for("NVIDIA H200") == 139.0 and memory_gib_for(None) is None
    assert peak_flops_for("NVIDIA-H100-80GB-HBM3") == peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert mfu.peak_flops_for is peak_flops_for  # the trainer's MFU and the estimate agree by construction


@pytest.mark.parametrize(
    "cfg, field",
    [
        ({k: v for k, v in LLAMA3_8B.items() if k != "hidden_size"}, "config.json hidden_size"),
        (LLAMA3_8B | {"num_hidden_layers": "32"}, "config.json num_hidden_layers"),
        (LLAMA3_8B | {"num_local_experts": 8}, "config.json"),
        ([], "config.json"),
    ],
)
def test_a_config_the_estimator_cannot_use_names_the_key(cfg, field):
    with pytest.raises(EstimateError) as e:
        ModelArch.from_config(cfg)
    assert e.value.field == field


# ---- kubetune estimate ----------------------------------------------------------------------


def _job(tmp_path, **spec_changes):
    spec = {
        "baseModel": {"uri": "meta-llama/Meta-Llama-3-8B"},
        "dataset": {"uri": "s3://data/chats.jsonl"},
        "method": "qlora",
        "training": {"maxSteps": 1000, "batchSize": 1, "maxSeqLength": 2048},
        "resources": {"gpus": 1, "gpuType": L4},
        "capacity": {"policy": "spot-preferred"},
        "checkpoints": {"uri": "s3://ckpt"},
        "output": {"uri": "s3://out"},
    } | spec_changes
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"}, "spec": spec}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA3_8B))
    return str(path), str(cfg)


def test_cli_prints_the_estimate_as_json(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBETUNE_GPU_PRICES", raising=False)
    job, cfg = _job(tmp_path)
    assert cli.main(["estimate", "-f", job, "--model-config", cfg]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"gpuMemoryGiB", "fits", "advice", "estimatedGpuHours", "estimatedUsd"} <= out.keys()
    assert out["fits"] is True and out["gpuType"] == L4
    assert out["usdPerGpuHour"] == [0.32, 0.81]  # spot..on-demand of the operator's L4 row
    assert float(out["estimatedUsd"]["low"]) == pytest.approx(out["estimatedGpuHours"]["low"] * 0.32, rel=0.02)
    assert cli.main(["estimate", "-f", job, "--model-config", cfg, "--gpu-type", "Tesla-T4"]) == 0
    assert json.loads(capsys.readouterr().out)["gpuCapacityGiB"] == 15.0


@pytest.mark.parametrize(
    "change, says",
    [
        ({"training": {"maxSteps": 10, "batchSize": 0}}, "spec.training.batchSize"),
        ({"method": "sgd"}, "spec.method"),
        ({"baseModel": {"uri": "org/not-downloaded"}}, "--model-config"),
    ],
)
def test_cli_bad_input_names_the_file_and_field_and_exits_2(tmp_path, capsys, monkeypatch, change, says):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    job, cfg = _job(tmp_path, **change)
    args = ["estimate", "-f", job] + ([] if "baseModel" in change else ["--model-config", cfg])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert says in err and ("job.yaml" in err or "baseModel.uri" in err)


def test_cli_bad_files_exit_2(tmp_path, capsys, monkeypatch):
    job, cfg = _job(tmp_path)
    assert cli.main(["estimate", "-f", str(tmp_path / "missing.yaml"), "--model-config", cfg]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert cli.main(["estimate", "-f", job, "--model-config", cfg]) == 2
    assert "config.json num_attention_heads" in capsys.readouterr().err
    (tmp_path / "hf/hub/models--meta-llama--Meta-Llama-3-8B/snapshots/abc").mkdir(parents=True)
    (tmp_path / "hf/hub/models--meta-llama--Meta-Llama-3-8B/snapshots/abc/config.json").write_text(
        json.dumps(LLAMA3_8B)
    )
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli.main(["estimate", "-f", job]) == 0  # found in the Hugging Face cache, no download
