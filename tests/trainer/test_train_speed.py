"""The speed changes keep training exact: padding-free packing (SDPA-family varlen and transformers'
flash_attention_2 path) gives every example the loss and gradients it has alone and never lets one
example see another; checkpointing modes change memory, not results; Liger and compile are opt-in
and refuse clearly; LoRA has no dropout and no fp32 input copy; one host read per step."""

from __future__ import annotations

import pytest
import torch

from kubetune_contract.config import LoraSpec, TrainerConfig
from kubetune_dev.model_shapes import LLAMA3_8B
from kubetune_dev.trainer_inputs import trainer_config
from kubetune_trainer import attention as A
from kubetune_trainer import model as M
from kubetune_trainer import speed
from kubetune_trainer.data import IGNORE, Example, collate, pack
from kubetune_trainer.errors import UserError

VOCAB = 96


def _gqa_model(attn: str, layers: int = 3):
    """A random-init Llama shape with GQA (4 query heads, 2 K/V heads), fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


def _examples(seed: int = 1, lengths=(9, 5, 13, 7)) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] + ids[1:], n))
    return out


def _alone(model, ex: Example):
    ids = torch.tensor([ex.input_ids])
    return model(input_ids=ids, use_cache=False).logits[0]


def _packed_logits(model, exs):
    batch = collate(pack(exs, 24))  # two packed sequences of the micro-batch, flattened to one row
    return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]


def test_packed_logits_equal_each_example_alone_and_no_mask_is_built(monkeypatch):
    ref = _gqa_model("sdpa")
    varlen = _gqa_model(A.register())
    varlen.load_state_dict(ref.state_dict())
    exs = _examples()
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((tuple(q.shape), attn_mask, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        logits = _packed_logits(varlen, exs)
    # per example, causal, no mask at all: nothing of size L^2 (or (B, 1, L, L)) was built
    assert seen and all(m is None and causal for _, m, causal in seen)
    assert {s[1] for s, _, _ in seen} == {len(e.input_ids) for e in exs}
    monkeypatch.undo()
    off = 0
    with torch.no_grad():
        for e in exs:
            n = len(e.input_ids)
            torch.testing.assert_close(logits[off : off + n], _alone(ref, e), atol=1e-5, rtol=1e-5)
            off += n


def test_perturbing_one_example_changes_no_other():
    model = _gqa_model(A.register())
    exs = _examples()
    other = list(exs)
    other[1] = Example([t % 50 + 40 for t in exs[1].input_ids], exs[1].labels, 5)
    with torch.no_grad():
        a, b = _packed_logits(model, exs), _packed_logits(model, other)
    bounds = [0]
    for e in exs:
        bounds.append(bounds[-1] + len(e.input_ids))
    for i in range(len(exs)):
        s = slice(bounds[i], bounds[i + 1])
        if i == 1:
            assert not torch.allclose(a[s], b[s])
        else:
            torch.testing.assert_close(a[s], b[s], atol=0, rtol=0)


def test_packed_training_step_equals_the_examples_run_unpacked(tiny_model_dir):
    """Through the trainer's own path (load_model with LoRA, M.forward): loss and every adapter
    gradient of one packed micro-batch equal the sum over the examples run one by one."""
    cfg = TrainerConfig.model_validate(
        trainer_config(
            bucket="bucket-x",
            endpoint="http://127.0.0.1:1",
            model_dir=tiny_model_dir,
            data_uri="/x",
            lora={"r": 4, "dropout": 0.0},
        )
    )
    prec = M.resolve_precision("fp32", False)
    exs = _examples(lengths=(11, 6, 17, 9, 4))
    seqs = pack(exs, 32)
    assert len(seqs) == 2
    n_items = float(sum(s.trained_tokens for s in seqs))

    def grads_of(model):
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    packed = M.load_model(str(tiny_model_dir), cfg, prec, torch.device("cpu"))
    torch.manual_seed(0)
    alone = M.load_model(str(tiny_model_dir), cfg, prec, torch.device("cpu"))
    with torch.no_grad():  # LoRA B starts at 0: random adapters, the same in both models
        for (_, p), (_, q) in zip(packed.named_parameters(), alone.named_parameters(), strict=True):
            if p.requires_grad:
                p.normal_(0, 0.02)
                q.copy_(p)
    loss = M.forward(packed, seqs, n_items, torch.device("cpu"))
    loss.loss.backward()
    total = 0.0
    for e in exs:
        one = pack([e], 32)
        out = M.forward(alone, one, n_items, torch.device("cpu"))
        out.loss.backward()
        total += float(out.loss)
    assert float(loss.loss) == pytest.approx(total, rel=1e-5, abs=1e-6)
    g1, g2 = grads_of(packed), grads_of(alone)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-6, rtol=1e-4)


def test_flash_attention_2_gets_the_flattened_row_and_cu_seqlens(monkeypatch):
    """transformers' own flash_attention_2 integration, with a CPU stand-in for flash_attn's
    varlen kernel: the batch arrives flattened (B = 1) with our cu_seqlens, so the varlen branch
    runs and each example attends only to itself."""
    import transformers.modeling_flash_attention_utils as fau

    calls = []

    def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None):
        calls.append((tuple(q.shape), cu_seqlens_q.tolist(), max_seqlen_q, causal))
        assert causal and cu_seqlens_q is cu_seqlens_k
        return A._per_example(q, k, v, cu_seqlens_q.tolist(), softmax_scale, 0.0, None)

    def flash_dense(*a, **kw):
        raise AssertionError("the dense flash kernel would let packed examples attend to each other")

    process = fau._lazy_define_process_function(flash_varlen)
    monkeypatch.setattr(
        fau,
        "lazy_import_flash_attention",
        lambda *a, **k: ((flash_dense, flash_varlen, None, None, None), (process, None)),
    )
    ref = _gqa_model("sdpa")
    fa2 = _gqa_model("sdpa")
    fa2.load_state_dict(ref.state_dict())
    fa2.config._attn_implementation = "flash_attention_2"  # (flash-attn itself has no CPU build)
    exs = _examples(lengths=(6, 10, 3, 8))
    with torch.no_grad():
        logits = _packed_logits(fa2, exs)
    assert calls and all(c[0][0] == 27 and c[1] == [0, 6, 16, 19, 27] and c[2] == 10 for c in calls)
    off = 0
    with torch.no_grad():
        for e in exs:
            n = len(e.input_ids)
            torch.testing.assert_close(logits[off : off + n], _alone(ref, e), atol=1e-5, rtol=1e-5)
            off += n


def _cfg(tiny_model_dir, **training):
    return TrainerConfig.model_validate(
        trainer_config(
            bucket="bucket-x",
            endpoint="http://127.0.0.1:1",
            model_dir=tiny_model_dir,
            data_uri="/x",
            lora={"r": 4, "dropout": 0.0},
            training=training,
        )
    )


@pytest.mark.parametrize(
    ("mode", "every", "expect"),
    [
        ("never", None, [False, False]),
        ("always", None, [True, True]),
        ("always", 2, [True, False]),
        ("offload", None, [True, True]),
    ],
)
def test_checkpointing_modes_change_which_layers_recompute_not_the_gradients(tiny_model_dir, mode, every, expect):
    exs = _examples(lengths=(10, 7, 12))
    seqs = pack(exs, 32)
    n = float(sum(s.trained_tokens for s in seqs))
    prec = M.resolve_precision("fp32", False)
    grads = {}
    for m, e in (("never", None), (mode, every)):
        torch.manual_seed(0)
        cfg = _cfg(tiny_model_dir, gradientCheckpointing=m, gradientCheckpointingEveryNLayers=e)
        model = M.load_model(str(tiny_model_dir), cfg, prec, torch.device("cpu"))
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        M.forward(model, seqs, n, torch.device("cpu")).loss.backward()
        grads[m] = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        layers = speed.checkpointed_layers(model)
    assert layers == expect
    for k in grads["never"]:
        torch.testing.assert_close(grads[mode][k], grads["never"][k], atol=1e-6, rtol=1e-5)


def test_auto_checkpointing_is_off_on_cpu_and_sized_to_the_gpu(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, gradientCheckpointing="auto", batchSize=8, maxSeqLength=4096)
    assert speed.resolve_checkpointing(cfg, LLAMA3_8B, cuda=False, capacity_gib=None) == ("never", 1)
    assert speed.resolve_checkpointing(cfg, LLAMA3_8B, cuda=True, capacity_gib=1000.0) == ("never", 1)
    assert speed.resolve_checkpointing(cfg, LLAMA3_8B, cuda=True, capacity_gib=79.6)[0] in ("always", "offload")
    explicit = _cfg(tiny_model_dir, gradientCheckpointing="always", gradientCheckpointingEveryNLayers=3)
    assert speed.resolve_checkpointing(explicit, LLAMA3_8B, cuda=False, capacity_gib=None) == ("always", 3)
    model = M.load_model(
        str(tiny_model_dir),
        _cfg(tiny_model_dir, gradientCheckpointing="auto"),
        M.resolve_precision("fp32", False),
        torch.device("cpu"),
    )
    assert speed.checkpointed_layers(model) == [False, False]


def test_legacy_boolean_checkpointing_and_every_n_needs_a_mode(tiny_model_dir):
    assert _cfg(tiny_model_dir, gradientCheckpointing=True).training.gradient_checkpointing == "always"
    assert _cfg(tiny_model_dir, gradientCheckpointing=False).training.gradient_checkpointing == "never"
    with pytest.raises(ValueError, match="gradientCheckpointingEveryNLayers needs"):
        _cfg(tiny_model_dir, gradientCheckpointing="never", gradientCheckpointingEveryNLayers=2)


def test_liger_auto_is_a_logged_no_op_on_cpu_and_always_refuses_clearly(tiny_model_dir, capsys):
    assert speed.apply_liger(_cfg(tiny_model_dir, liger="auto"), "llama", cuda=False) is False
    assert '"liger"' in capsys.readouterr().out  # the log line says why it is off
    assert speed.apply_liger(_cfg(tiny_model_dir, liger="never"), "llama", cuda=True) is False
    with pytest.raises(UserError, match=r"training.liger=always needs a GPU"):
        speed.apply_liger(_cfg(tiny_model_dir, liger="always"), "llama", cuda=False)
    with pytest.raises(UserError, match=r"training.liger=always: Liger has no kernels for model_type 'gpt2'"):
        speed.apply_liger(_cfg(tiny_model_dir, liger="always"), "gpt2", cuda=True)
    assert speed.apply_liger(_cfg(tiny_model_dir, liger="auto"), "gpt2", cuda=True) is False


def test_lora_has_no_dropout_and_no_fp32_input_copy_under_bf16(tiny_model_dir):
    assert LoraSpec().dropout == 0.0
    cfg = _cfg(tiny_model_dir)
    prec = M.resolve_precision("bf16", False)
    model = M.load_model(str(tiny_model_dir), cfg, prec, torch.device("cpu"))
    seen = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
        for n, m in model.named_modules()
        if n.endswith("lora_A.default")
    ]
    assert hooks
    drop = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert drop and all(isinstance(m, torch.nn.Identity) for m in drop)
    seqs = pack(_examples(lengths=(8, 8)), 32)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = M.forward(model, seqs, 14.0, torch.device("cpu"))
    out.loss.float().backward()
    assert seen == {torch.bfloat16}  # the adapters read the bf16 activations, no fp32 copy
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_one_host_read_per_step_not_per_micro_batch(tiny_model_dir, monkeypatch):
    from kubetune_trainer import step
    from kubetune_trainer.dist import Dist, DistEnv
    from kubetune_trainer.state import TrainingParts

    cfg = _cfg(tiny_model_dir)
    model = M.load_model(str(tiny_model_dir), cfg, M.resolve_precision("fp32", False), torch.device("cpu"))
    parts = TrainingParts(model=model, wrapped=model, trainable=[], optimizer=None, scheduler=None)
    mbs = [pack(_examples(seed=i, lengths=(7, 9)), 32) for i in range(4)]
    reads = []
    real_float, real_item = torch.Tensor.__float__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: reads.append("float") or real_float(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
    import contextlib

    out = step.accumulate(mbs, parts, Dist(DistEnv(), torch.device("cpu")), contextlib.nullcontext(), 50.0, 0, None)
    assert out is not None and out.loss_sum > 0
    assert reads == ["float"]  # four micro-batches, one read


def test_regional_compile_wraps_every_decoder_layer(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, compile="regional")
    model = M.load_model(
        str(tiny_model_dir), _cfg(tiny_model_dir), M.resolve_precision("fp32", False), torch.device("cpu")
    )
    assert cfg.training.compile == "regional"
    assert speed.compile_regions(model, "regional", backend="eager") == 2
    seqs = pack(_examples(lengths=(8, 5)), 32)
    M.forward(model, seqs, 11.0, torch.device("cpu")).loss.backward()
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert all(m._compiled_call_impl is not None for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
