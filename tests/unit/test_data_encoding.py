"""Loss masks per format, packing without cross-contamination, deterministic batches."""

import copy

import pytest

from kubetune_contract.config import DatasetSpec
from kubetune_contract.uris import local_path_for_uri, pvc_claim
from kubetune_dev.tiny_model import chat_records
from kubetune_trainer.data import (
    IGNORE,
    Batches,
    Encoder,
    Example,
    RecordError,
    build_sequences,
    collate,
    collate_padded,
    pack,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def _trained_text(tok, ex):
    return tok.decode([t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE])


def test_instruction_without_template_trains_on_response_only(plain_tok):
    enc = Encoder(DatasetSpec(uri="x", format="instruction"), plain_tok, 64)
    ex = enc({"prompt": "count from one", "response": "two three"})
    n_prompt = len(plain_tok("count from one\n")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == plain_tok.eos_token_id
    assert _trained_text(plain_tok, ex).replace(" ", "").startswith("twothree")


def test_instruction_with_system_through_chat_template(tok):
    spec = DatasetSpec(uri="x", format="instruction", fields={"system": "sys"})
    ex = Encoder(spec, tok, 64)({"sys": "you are a counter", "prompt": "count from one", "response": "two three"})
    full = tok.decode(ex.input_ids)
    assert "<|system|>" in full and "<|user|>" in full
    trained = _trained_text(tok, ex)
    assert "two" in trained and "three" in trained and "<|end|>" in trained
    assert "count" not in trained and "counter" not in trained and "<|user|>" not in trained


def test_chat_trains_on_every_assistant_turn_only(tok):
    rec = chat_records(1, seed=3)[0]
    ex = Encoder(DatasetSpec(uri="x", format="chat"), tok, 256)(rec)
    trained = _trained_text(tok, ex)
    for m in rec["messages"]:
        for w in m["content"].split():
            if m["role"] == "assistant":
                assert w in trained
            elif w not in " ".join(x["content"] for x in rec["messages"] if x["role"] == "assistant"):
                assert w not in trained
    assert trained.count("<|end|>") == 2  # each assistant turn learns to stop
    assert ex.labels[0] == IGNORE


def test_chat_needs_a_template(plain_tok):
    from kubetune_trainer.errors import UserError

    with pytest.raises(UserError, match="chat template"):
        Encoder(DatasetSpec(uri="x", format="chat"), plain_tok, 64)


def test_chat_prompt_longer_than_max_is_too_long(tok):
    rec = {"messages": [{"role": "user", "content": "one " * 100}, {"role": "assistant", "content": "two"}]}
    with pytest.raises(RecordError, match="too long"):
        Encoder(DatasetSpec(uri="x", format="chat"), tok, 32)(rec)


def _ex(n, start):
    ids = list(range(start, start + n))
    return Example(ids, [IGNORE] + ids[1:], n)


def test_packing_keeps_examples_whole_and_resets_positions():
    exs = [_ex(5, 10), _ex(7, 20), _ex(4, 30), _ex(9, 40)]
    seqs = pack(exs, 16)
    assert [len(s) for s in seqs] == [16, 9]  # 5+7+4 | 9 (never split an example)
    s0 = seqs[0]
    assert s0.position_ids == list(range(5)) + list(range(7)) + list(range(4))
    # the first token of every example is never a target (no prediction across the boundary)
    for start in (0, 5, 12):
        assert s0.labels[start] == IGNORE
    assert sum(len(s) for s in seqs) == sum(len(e.input_ids) for e in exs)
    assert build_sequences(exs, 16, packing=False)[1].position_ids == list(range(7))


def test_packed_examples_do_not_attend_to_each_other(tiny_model_dir):
    """Logits of a packed sequence equal those of its examples run one by one."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    exs = [_ex(6, 10), _ex(5, 40), _ex(7, 70)]
    packed = collate_padded(pack(exs, 64), pad_id=3)
    with torch.no_grad():
        # (no KV cache: transformers derives the block-diagonal mask from restarting position ids)
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        off = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[off : off + len(e.input_ids)], alone, atol=1e-5, rtol=1e-4)
            off += len(e.input_ids)


def test_collate_pads_labels_and_positions():
    seqs = build_sequences([_ex(3, 10), _ex(5, 20)], 64, packing=False)
    b = collate_padded(seqs, pad_id=0)
    assert b["input_ids"].shape == (2, 5)
    assert b["labels"][0].tolist() == [IGNORE, 11, 12, IGNORE, IGNORE]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1]


def test_collate_is_padding_free():
    """One flattened row, no padding, the example boundaries as cu_seq_lens (packed or not)."""
    seqs = pack([_ex(3, 10), _ex(5, 20), _ex(4, 30)], 8) + build_sequences([_ex(2, 40)], 8, packing=False)
    b = collate(seqs)
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (1, 14)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 8, 12, 14] and b["cu_seq_lens_q"].dtype.is_floating_point is False
    assert b["cu_seq_lens_k"] is b["cu_seq_lens_q"]
    assert b["max_length_q"] == b["max_length_k"] == 5
    assert [b["labels"][0, i].item() for i in (0, 3, 8, 12)] == [IGNORE] * 4  # no target across a boundary


def test_batches_are_deterministic_cover_everything_and_split_by_rank():
    seqs = build_sequences([_ex(2, i * 3) for i in range(10)], 64, packing=False)
    b = Batches(seqs, batch_size=2, world=2, seed=1)
    assert b.micro_per_epoch == 3  # 10 sequences / 4 per global micro-batch, padded by wrapping
    seen = []
    for m in range(b.micro_per_epoch):
        r0, r1 = b.micro_batch(0, m, 0), b.micro_batch(0, m, 1)
        assert len(r0) == len(r1) == 2
        seen += [s.input_ids[0] for s in r0 + r1]
    assert set(seen) == {i * 3 for i in range(10)}
    again = Batches(seqs, batch_size=2, world=2, seed=1)
    assert [s.input_ids for s in again.micro_batch(1, 2, 1)] == [s.input_ids for s in b.micro_batch(1, 2, 1)]
    assert b.order(0) != b.order(1)  # reshuffled per epoch
    assert b.steps_per_epoch(grad_accum=2) == 2


def test_pvc_uri_mapping():
    assert local_path_for_uri("pvc://models/llama/7b") == "/mnt/kubetune/pvc/models/llama/7b"
    assert local_path_for_uri("pvc://data", pvc_root="/x") == "/x/data"
    assert local_path_for_uri("pvc://data/../etc") is None
    assert local_path_for_uri("s3://b/k") is None and local_path_for_uri("org/name") is None
    assert local_path_for_uri("/abs/dir") == "/abs/dir"
    assert pvc_claim("pvc://claim-a/x") == "claim-a" and pvc_claim("s3://b") is None
