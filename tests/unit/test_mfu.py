"""MFU's pure parts (kubetune_trainer.mfu) on known numbers: a Llama-2-7B shape, the peak table."""

from types import SimpleNamespace

import pytest

from kubetune_trainer import mfu

# Llama-2-7B: 6,738,415,616 parameters, 32 layers, hidden size 4096; 4096-token sequences.
N_7B, LAYERS, HIDDEN, SEQ = 6_738_415_616, 32, 4096, 4096
# LoRA r=8 on q_proj and v_proj: 32 layers x 2 modules x (4096x8 + 8x4096)
LORA_TRAINABLE = 32 * 2 * (4096 * 8 + 8 * 4096)


def test_full_fine_tuning_is_6n_plus_the_attention_term():
    shape = mfu.ModelShape(N_7B, N_7B, LAYERS, HIDDEN, SEQ)
    attn = 12 * 32 * 4096 * 4096
    assert attn == 6_442_450_944
    assert mfu.flops_per_token(shape, "full") == 6 * N_7B + attn == pytest.approx(46.873e9, rel=1e-4)


def test_lora_skips_the_frozen_weights_gradients():
    total = N_7B + LORA_TRAINABLE  # peft counts the adapters in the total
    shape = mfu.ModelShape(total, LORA_TRAINABLE, LAYERS, HIDDEN, SEQ)
    assert shape.frozen_params == N_7B
    want = 4 * N_7B + 6 * LORA_TRAINABLE + 12 * 32 * 4096 * 4096
    assert mfu.flops_per_token(shape, "lora") == want == pytest.approx(33.42e9, rel=1e-3)
    assert mfu.flops_per_token(shape, "qlora") == want
    # about 2/3 of full fine-tuning's per-token work on the weights
    full = mfu.flops_per_token(mfu.ModelShape(N_7B, N_7B, LAYERS, HIDDEN, SEQ), "full")
    assert 0.70 < want / full < 0.72


def test_mfu_is_achieved_over_peak_flops_of_all_gpus():
    fpt = mfu.flops_per_token(mfu.ModelShape(N_7B, N_7B, LAYERS, HIDDEN, SEQ), "full")
    # 3,000 tokens/s per GPU on 8 H100 SXM: 8 x 3000 x 46.87e9 / (8 x 989e12) = 14.2%
    assert mfu.mfu(8 * 3000, fpt, 989e12, 8) == pytest.approx(0.1422, abs=1e-4)
    assert mfu.mfu(8 * 3000, fpt, None, 8) is None  # unknown GPU: absent, not 0
    assert mfu.mfu(3000, fpt, 989e12, 0) is None  # no GPU


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA A10", 125e12),
        ("Tesla T4", 65e12),
        ("NVIDIA GeForce RTX 4090", None),
        ("", None),
        (None, None),
    ],
)
def test_peak_flops_by_gpu_name(name, peak):
    assert mfu.peak_flops_for(name) == peak


def test_shape_comes_from_the_hugging_face_config():
    from transformers import LlamaConfig

    model = SimpleNamespace(config=LlamaConfig(num_hidden_layers=4, hidden_size=64))
    assert mfu.shape_of(model, 10, 100, 37.5) == mfu.ModelShape(100, 10, 4, 64, 37.5)
    assert mfu.shape_of(SimpleNamespace(), 10, 100, 37.5) is None
