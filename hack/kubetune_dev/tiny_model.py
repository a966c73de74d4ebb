"""A tiny causal LM and tokenizer, built locally (never downloaded) for the tests, the demo and bench/.

`build_tiny_model(dest)` writes a random-weight 2-layer Llama plus a BPE tokenizer trained on
`corpus()` (wrapped as PreTrainedTokenizerFast, with a small chat template) into `dest`, the
layout `AutoModelForCausalLM/AutoTokenizer.from_pretrained(dest)` reads. The tests' session
fixture `tiny_model_dir` (tests/fixtures/tiny_model.py) builds it once; `make demo` and bench/
build bigger ones.

The data helpers produce a *learnable* task (counting in words), so "the loss falls" is a real
check: a model that learns nothing stays near ln(vocab).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Prefix-stable: rendering messages[:i] (+ generation prompt) is a prefix of rendering messages[:i+1].
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def count_text(start: int, n: int) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def corpus() -> list[str]:
    lines = [count_text(s, 12) for s in range(len(WORDS))]
    lines += [
        "count from",
        "continue",
        "next",
        "after",
        "you are a counter",
        "say",
        "please",
        "the quick brown fox jumps over the lazy dog",
        "hello world",
    ]
    return lines


def text_records(n: int, seed: int = 0, length: int = 10) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": count_text(rng.randrange(len(WORDS)), length)} for _ in range(n)]


def instruction_records(n: int, seed: int = 0, system: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randrange(len(WORDS))
        rec = {"prompt": f"count from {WORDS[s]}", "response": count_text(s + 1, 6)}
        if system:
            rec["system"] = "you are a counter"
        out.append(rec)
    return out


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randrange(len(WORDS))
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "you are a counter"},
                    {"role": "user", "content": f"count from {WORDS[s]}"},
                    {"role": "assistant", "content": count_text(s + 1, 3)},
                    {"role": "user", "content": "continue"},
                    {"role": "assistant", "content": count_text(s + 4, 3)},
                ]
            }
        )
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def build_tokenizer(dest: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(dest)
    return fast


def build_tiny_model(
    dest: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    seed: int = 0,
    init_range: float = 0.1,
) -> Path:
    """Write a random-weight Llama + tokenizer to `dest`; returns `dest`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(dest)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest)
    return dest
