"""`python -m kubetune_trainer.merge BASE ADAPTER DEST PRECISION [REVISION] [TRUST_REMOTE_CODE]`:
the base model (unquantised, CPU) + a saved adapter, merged, written to DEST with the adapter's
tokenizer. A process of its own (`export`): its memory is freed when it ends, and an
out-of-memory kill ends only it."""

from __future__ import annotations

import sys


def merge(base_src: str, adapter: str, dest: str, precision: str, revision: str | None, trust: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if precision == "bf16" else (torch.float16 if precision == "fp16" else torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_src, dtype=dtype, revision=revision, trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(dest)


def main(argv: list[str]) -> int:
    base_src, adapter, dest, precision = argv[:4]
    revision = (argv[4] if len(argv) > 4 else "") or None
    trust = len(argv) > 5 and argv[5] == "1"
    merge(base_src, adapter, dest, precision, revision, trust)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
