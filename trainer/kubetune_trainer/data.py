"""Training data: read JSONL/Parquet, validate every record (preflight), tokenize, pack, batch.

Formats (DatasetSpec.format):
- text: one field of text; loss on every token.
- instruction: prompt + response (+ optional system); loss on the response only. With a tokenizer
  that has a chat template the record is rendered as [system?, user, assistant] messages through
  it; otherwise as "<system>\\n\\n<prompt>\\n" followed by "<response><eos>".
- chat: a list of {role, content} messages rendered through the tokenizer's chat template; loss
  on the assistant turns only (found by rendering each prefix of the conversation, so any template
  whose rendering is prefix-stable works without `{% generation %}` markers).

Packing puts whole examples (never split) into sequences of at most max_seq_length tokens. Each
example's position ids restart at 0. A micro-batch reaches the model padding-free (`collate`):
one flattened row with the example boundaries as `cu_seq_lens`, which the attention
(kubetune_trainer.attention) runs per example, so packed examples never attend to each other and
no L² mask is built. The first token of every example has label -100, so no example is trained to
predict from its neighbour's last token.

Ordering is deterministic: the epoch-e order is a permutation seeded by (seed, e), independent of
any global RNG, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_contract.config import DatasetSpec

from .errors import UserError

IGNORE = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")
MAX_REPORTED_BAD = 50  # bad records listed one by one in the report (all are counted)


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class BadRecord:
    file: str
    line: int  # 1-based line (JSONL) or row (Parquet)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class RecordError(ValueError):
    """A record that cannot become a training example; the message is the reason."""


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES)


def local_data_files(path: Path) -> list[Path]:
    """A data file, or every data file below a directory (sorted, so the order is stable)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.name))
        if not files:
            raise UserError(f"dataset: no .jsonl or .parquet files under {path}")
        return files
    raise UserError(f"dataset: {path} does not exist")


def read_records(path: Path, display: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line, record) for every record; a record that cannot be parsed is a BadRecord."""
    name = display or str(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
        except Exception as e:  # not parquet at all
            yield 1, BadRecord(name, 1, f"unreadable Parquet file: {e}")
            return
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
        return
    if path.suffix.lower() == ".json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):  # a JSON array of records; "line" is the 1-based index
            try:
                items = json.loads(path.read_bytes())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield 1, BadRecord(name, 1, f"bad JSON: {e}")
                return
            yield from enumerate(items, start=1)
            return
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except UnicodeDecodeError:
                yield i, BadRecord(name, i, "bad JSON: not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield i, BadRecord(name, i, f"bad JSON: {e.msg} at column {e.colno}")
                continue
            yield i, rec


def file_sha256(paths: Iterable[Path]) -> str:
    """One digest over the files' contents, in order (the dataset identity in the model card)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# encoding


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    raw_length: int  # before truncation
    truncated: bool = False


def _get_str(rec: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise RecordError(f"missing field '{key}'")
        return None
    v = rec[key]
    if not isinstance(v, str):
        raise RecordError(f"field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise RecordError(f"empty text in field '{key}'")
    return v


def _required_str(rec: dict, key: str) -> str:
    v = _get_str(rec, key)
    assert v is not None  # _get_str raises for a missing required field
    return v


class Encoder:
    """Turns one record into an Example, or raises RecordError with the reason."""

    def __init__(self, spec: DatasetSpec, tokenizer, max_seq_length: int):
        self.spec = spec
        self.tok = tokenizer
        self.max_len = max_seq_length
        self.eos = tokenizer.eos_token_id
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.prefix_unstable = 0  # chat records whose template rendering was not prefix-stable
        if spec.format == "chat" and not self.has_template:
            raise UserError(
                "dataset.format=chat needs a tokenizer with a chat template; "
                "this base model's tokenizer has none (use format instruction or text)"
            )

    # -- formats
    def __call__(self, rec: Any) -> Example:
        if not isinstance(rec, dict):
            raise RecordError(f"record must be a JSON object, got {type(rec).__name__}")
        fmt = self.spec.format
        f = self.spec.fields
        if fmt == "text":
            text = _get_str(rec, f.text)
            ids = list(self.tok(text, add_special_tokens=True)["input_ids"])
            if self.eos is not None:
                ids.append(self.eos)
            labels = list(ids)
            return self._finish(ids, labels, prompt_len=0)
        if fmt == "instruction":
            prompt = _required_str(rec, f.prompt)
            response = _required_str(rec, f.response)
            system = _get_str(rec, f.system, required=False) if f.system else None
            if self.has_template:
                msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
                msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
                return self._chat(msgs)
            ptext = (f"{system}\n\n" if system else "") + prompt + "\n"
            p_ids = list(self.tok(ptext, add_special_tokens=True)["input_ids"])
            r_ids = list(self.tok(response, add_special_tokens=False)["input_ids"])
            if self.eos is not None:
                r_ids.append(self.eos)
            return self._finish(p_ids + r_ids, [IGNORE] * len(p_ids) + r_ids, prompt_len=len(p_ids))
        # chat
        messages = rec.get(f.messages)
        if messages is None:
            raise RecordError(f"missing field '{f.messages}'")
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"field '{f.messages}' must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RecordError(f"{f.messages}[{i}] must be an object with role and content")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not role:
                raise RecordError(f"{f.messages}[{i}].role must be a non-empty string")
            if not isinstance(content, str):
                raise RecordError(f"{f.messages}[{i}].content must be a string, got {type(content).__name__}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise RecordError("empty text: no assistant message with content")
        return self._chat([{"role": m["role"], "content": m["content"]} for m in messages])

    def _render(self, msgs: list[dict], gen: bool) -> str:
        if not msgs and not gen:
            return ""
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _chat(self, msgs: list[dict]) -> Example:
        try:
            full = self._render(msgs, False)
        except Exception as e:
            raise RecordError(f"chat template failed: {e}") from None
        spans: list[tuple[int, int]] = []
        stable = True
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            try:
                before = self._render(msgs[:i], True) if i else ""
                upto = self._render(msgs[: i + 1], False)
            except Exception:
                stable = False
                break
            if not (full.startswith(upto) and upto.startswith(before)):
                stable = False
                break
            spans.append((len(before), len(upto)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=stable)
        ids = list(enc["input_ids"])
        if not stable:
            self.prefix_unstable += 1
            return self._finish(ids, list(ids), prompt_len=0)
        labels = []
        for tid, (s, _e) in zip(ids, enc["offset_mapping"], strict=True):
            labels.append(tid if any(a <= s < b for a, b in spans) else IGNORE)
        first = next((i for i, label in enumerate(labels) if label != IGNORE), None)
        if first is None:
            raise RecordError("empty text: no assistant tokens")
        return self._finish(ids, labels, prompt_len=first)

    def _finish(self, ids: list[int], labels: list[int], prompt_len: int) -> Example:
        n = len(ids)
        if n == 0:
            raise RecordError("empty text: no tokens")
        if prompt_len >= self.max_len:
            raise RecordError(f"too long: the prompt alone is {prompt_len} tokens, max_seq_length is {self.max_len}")
        labels[0] = IGNORE  # never predicted from a (packed) neighbour
        if not any(label != IGNORE for label in labels[: self.max_len]):
            raise RecordError("empty text: nothing to train on")
        if n > self.max_len:
            return Example(ids[: self.max_len], labels[: self.max_len], n, True)
        return Example(ids, labels, n, False)


# ---------------------------------------------------------------------------------------------
# preflight


@dataclass
class LengthStats:
    count: int = 0
    min: int = 0
    mean: float = 0.0
    p50: int = 0
    p95: int = 0
    max: int = 0
    truncated: int = 0

    @classmethod
    def of(cls, examples: list[Example]) -> LengthStats:
        if not examples:
            return cls()
        lens = sorted(e.raw_length for e in examples)
        n = len(lens)

        def pct(p: float) -> int:
            return lens[min(n - 1, max(0, math.ceil(p * n) - 1))]

        return cls(
            n, lens[0], round(sum(lens) / n, 2), pct(0.5), pct(0.95), lens[-1], sum(e.truncated for e in examples)
        )


@dataclass
class PreflightReport:
    records: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    bad_count: int = 0
    stats: LengthStats = field(default_factory=LengthStats)
    prefix_unstable: int = 0

    @property
    def bad_fraction(self) -> float:
        return self.bad_count / self.records if self.records else 0.0

    def summary(self) -> dict:
        return {
            "records": self.records,
            "bad_records": self.bad_count,
            "bad_fraction": round(self.bad_fraction, 6),
            "tokens": self.stats.__dict__,
        }


def encode_files(
    files: list[tuple[Path, str]],
    spec: DatasetSpec,
    tokenizer,
    max_seq_length: int,
    report: PreflightReport | None = None,
) -> tuple[list[Example], PreflightReport]:
    """Validate and encode every record of the (local path, display name) files."""
    report = report or PreflightReport()
    enc = Encoder(spec, tokenizer, max_seq_length)
    examples: list[Example] = []
    for path, display in files:
        for line, rec in read_records(path, display):
            report.records += 1
            if isinstance(rec, BadRecord):
                bad = rec
            else:
                try:
                    examples.append(enc(rec))
                    continue
                except RecordError as e:
                    bad = BadRecord(display, line, str(e))
            report.bad_count += 1
            if len(report.bad) < MAX_REPORTED_BAD:
                report.bad.append(bad)
    report.prefix_unstable += enc.prefix_unstable
    report.stats = LengthStats.of(examples)
    return examples, report


def check_bad_fraction(report: PreflightReport, spec: DatasetSpec, what: str = "dataset") -> None:
    if report.records == 0:
        raise UserError(f"{what}: no records found at {spec.uri}")
    if report.bad_fraction > spec.max_bad_record_fraction or report.bad_count == report.records:
        listed = "; ".join(str(b) for b in report.bad[:10])
        more = f" (and {report.bad_count - 10} more)" if report.bad_count > 10 else ""
        raise UserError(
            f"{what}: {report.bad_count} of {report.records} records are malformed "
            f"({report.bad_fraction:.2%} > dataset.maxBadRecordFraction "
            f"{spec.max_bad_record_fraction:.2%}): {listed}{more}"
        )


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic hold-out by seed (record order preserved on both sides)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


# ---------------------------------------------------------------------------------------------
# packing and batching


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Tokens the loss is taken over: the model shifts labels by one, so position 0 is never
        a target. The step's all-reduced sum is the loss's `num_items_in_batch`."""
        return sum(1 for label in self.labels[1:] if label != IGNORE)


def to_sequence(ex: Example) -> Sequence:
    return Sequence(list(ex.input_ids), list(ex.labels), list(range(len(ex.input_ids))))


def pack(examples: list[Example], max_len: int) -> list[Sequence]:
    """Greedy, order-preserving packing of whole examples into sequences of at most max_len."""
    out: list[Sequence] = []
    cur = Sequence([], [], [])
    for ex in examples:
        n = len(ex.input_ids)
        if len(cur) and len(cur) + n > max_len:
            out.append(cur)
            cur = Sequence([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += range(n)
    if len(cur):
        out.append(cur)
    return out


def build_sequences(examples: list[Example], max_len: int, packing: bool) -> list[Sequence]:
    return pack(examples, max_len) if packing else [to_sequence(e) for e in examples]


def collate(seqs: list[Sequence]) -> dict:
    """Padding-free: the micro-batch's sequences concatenated into one row (B = 1), no padding and
    no attention mask. Position ids restart at 0 for every example; `cu_seq_lens_q/k` are the
    examples' cumulative lengths (int32) and `max_length_q/k` the longest example, the arguments
    of varlen attention kernels (kubetune_trainer.attention). The loss shifts labels by one inside
    the row, so the last token of an example is scored against the next example's first label,
    which is always IGNORE (Encoder._finish)."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for s in seqs:
        ids += s.input_ids
        labels += s.labels
        pos += s.position_ids
    bounds = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


def collate_padded(seqs: list[Sequence], pad_id: int) -> dict:
    """The (B, L) layout a stock transformers.Trainer collator gives (the benchmarks' baseline):
    right-padded to the longest sequence, no attention mask; padding gets its own restarting
    position ids, from which transformers builds a dense (B, 1, L, L) block-diagonal mask."""
    import torch

    width = max(len(s) for s in seqs)
    ids, labels, pos = [], [], []
    for s in seqs:
        pad = width - len(s)
        ids.append(s.input_ids + [pad_id] * pad)
        labels.append(s.labels + [IGNORE] * pad)
        pos.append(s.position_ids + list(range(pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }


class Batches:
    """Deterministic global micro-batches for `world` ranks of `batch_size` sequences each.

    Epoch e's order is a permutation seeded by (seed, e), padded by wrapping around to a whole
    number of global micro-batches so every rank always has a full micro-batch.
    """

    def __init__(self, seqs: list[Sequence], batch_size: int, world: int, seed: int, shuffle: bool = True):
        if not seqs:
            raise UserError("dataset: no training sequences left after preflight")
        self.seqs = seqs
        self.batch_size = batch_size
        self.world = world
        self.seed = seed
        self.shuffle = shuffle
        self.global_micro = batch_size * world
        self.micro_per_epoch = math.ceil(len(seqs) / self.global_micro)
        self._order_epoch: int | None = None
        self._order: list[int] = []

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            idx = list(range(len(self.seqs)))
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(idx)
            need = self.micro_per_epoch * self.global_micro
            while len(idx) < need:
                idx += idx[: need - len(idx)]
            self._order, self._order_epoch = idx, epoch
        return self._order

    def micro_batch(self, epoch: int, micro: int, rank: int) -> list[Sequence]:
        o = self.order(epoch)
        start = micro * self.global_micro + rank * self.batch_size
        return [self.seqs[i] for i in o[start : start + self.batch_size]]

    def steps_per_epoch(self, grad_accum: int) -> int:
        return math.ceil(self.micro_per_epoch / grad_accum)
