"""The phases before the model: S3 access, the base model's files and tokenizer, the dataset's
preflight. Everything that can fail because of the user's spec fails here, before a model loads;
the result is `Prepared`, all the step loop needs to know about the data.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig

from . import logs
from .dist import Dist


@dataclass
class Prepared:
    """The tokenizer and the data, ready to batch."""

    tokenizer: Any
    model_src: str  # a local directory or a hub id
    train_seqs: list  # data.Sequence
    eval_seqs: list
    batches: Any  # data.Batches over train_seqs for this world
    report: Any  # data.PreflightReport of the training data
    dataset_sha256: str
    total_steps: int
    steps_per_epoch: int


def check_s3_access(cfg: TrainerConfig, client: Any) -> None:
    """Missing buckets, bad credentials, read-only keys: before anything expensive."""
    from . import s3
    from .sources import is_s3

    checks = [(cfg.checkpoint_prefix, "checkpoints.uri", True), (cfg.output.uri, "output.uri", True)]
    for uri, fld in (
        (cfg.dataset.uri, "dataset.uri"),
        (cfg.dataset.validation_uri, "dataset.validationUri"),
        (cfg.base_model.uri, "baseModel.uri"),
    ):
        if uri and is_s3(uri):
            checks.append((uri, fld, False))
    for uri, fld, write in checks:
        s3.check_access(client, uri, field=fld, write=write)
    logs.log("s3_access_ok", endpoint=cfg.s3.endpoint or "aws", checked=[c[0] for c in checks])


def fetch_base_model(cfg: TrainerConfig, dist: Dist, client_factory: Callable[[], Any], work: Path) -> tuple[str, Any]:
    """(model source, tokenizer). One download per pod (its local rank 0), shared by the pod's
    other ranks; the tokenizer comes first because preflight needs it."""
    from .model import load_tokenizer
    from .sources import model_source

    fetched: list[str] = []
    dist.together(
        lambda: fetched.append(
            model_source(cfg, client_factory, work / "base-model", download=dist.env.local_rank == 0)
        ),
        "fetching the base model",
    )
    return fetched[0], load_tokenizer(fetched[0], cfg)


def preflight(
    cfg: TrainerConfig, dist: Dist, client_factory: Callable[[], Any], rank_dir: Path, tokenizer: Any, model_src: str
) -> Prepared:
    """Validate and tokenise every record (exit 2 above maxBadRecordFraction), split off the
    validation data, build sequences and batches, count the steps."""
    from . import data as D
    from .sources import dataset_files

    t, ds = cfg.training, cfg.dataset
    files = dataset_files(ds.uri, client_factory, rank_dir / "data", "dataset.uri")
    examples, report = D.encode_files(files, ds, tokenizer, t.max_seq_length)
    report_preflight(report, "dataset", dist.rank0)
    D.check_bad_fraction(report, ds)
    dataset_sha = D.file_sha256(p for p, _ in files)
    if ds.validation_uri:
        vfiles = dataset_files(ds.validation_uri, client_factory, rank_dir / "val", "dataset.validationUri")
        eval_ex, vreport = D.encode_files(vfiles, ds, tokenizer, t.max_seq_length)
        report_preflight(vreport, "validation", dist.rank0)
        D.check_bad_fraction(vreport, ds, "validation dataset")
        train_ex = examples
    else:
        train_ex, eval_ex = D.split_validation(examples, ds.validation_split, t.seed)
    train_seqs = D.build_sequences(train_ex, t.max_seq_length, t.packing)
    eval_seqs = D.build_sequences(eval_ex, t.max_seq_length, t.packing) if eval_ex else []
    batches = D.Batches(train_seqs, t.batch_size, dist.env.world, t.seed)
    steps_per_epoch = batches.steps_per_epoch(t.gradient_accumulation_steps)
    if t.max_steps:
        total = t.max_steps
    else:
        assert t.epochs is not None  # the config requires maxSteps or epochs
        total = max(1, math.ceil(t.epochs * steps_per_epoch))
    logs.rank0(
        "dataset_ready",
        train_examples=len(train_ex),
        eval_examples=len(eval_ex),
        train_sequences=len(train_seqs),
        eval_sequences=len(eval_seqs),
        packing=t.packing,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        sha256=dataset_sha,
    )
    return Prepared(tokenizer, model_src, train_seqs, eval_seqs, batches, report, dataset_sha, total, steps_per_epoch)


def report_preflight(report: Any, what: str, rank0: bool) -> None:
    if not rank0:
        return
    for b in report.bad:
        logs.log("bad_record", "warning", dataset=what, file=b.file, line=b.line, reason=b.reason)
    if report.bad_count > len(report.bad):
        logs.log("bad_records_truncated", "warning", dataset=what, listed=len(report.bad), total=report.bad_count)
    if report.prefix_unstable:
        logs.log(
            "chat_template_not_prefix_stable",
            "warning",
            dataset=what,
            records=report.prefix_unstable,
            note="loss on all tokens of those records",
        )
    logs.log("preflight", dataset=what, **report.summary())


def fresh_rank_dir(work: Path, rank: int) -> Path:
    """This rank's scratch (data, restore staging), emptied: nothing of an earlier attempt leaks in."""
    rank_dir = work / f"rank{rank}"
    if rank_dir.exists():
        shutil.rmtree(rank_dir, ignore_errors=True)
    rank_dir.mkdir(parents=True)
    return rank_dir
