"""`python -m kubetune_trainer size`: the sizing pod's job, before any GPU is requested. Reads the
base model's config.json and, for a job given in training.epochs, sizes one epoch of the dataset,
with the job's own credentials and volumes; prints a kubetune_contract.sizing.SizingRecord (one
JSON line) and writes it as the termination message. The operator runs the estimator on it.

Dataset sizing: every record of the training files is read (parsed, not tokenised) and the first
sizing.SAMPLE_RECORDS are tokenised, split and packed as the trainer does (kubetune_trainer.data);
sequences and tokens of a larger dataset are that sample's, scaled by records / sampled records
(`counted: sample`). The model's weights are never downloaded: only config.json and, for the
dataset, the tokenizer's files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_contract.config import TrainerConfig
from kubetune_contract.layout import MESSAGE_MAX_CHARS, TERMINATION_LOG_LIMIT
from kubetune_contract.progress import ExitCode
from kubetune_contract.sizing import SAMPLE_RECORDS, DatasetFacts, SizingRecord, config_facts
from kubetune_contract.uris import is_s3

from . import logs
from .errors import KubetuneError, UserError
from .options import TrainerOptions

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")


def read_model_config(cfg: TrainerConfig, client_factory: Callable[[], Any]) -> dict[str, Any]:
    """The base model's config.json as a dict (s3://, pvc://, a local directory or a hub id)."""
    from .sources import local_path

    uri = cfg.base_model.uri
    where = f"baseModel.uri: {uri}"
    if is_s3(uri):
        from . import s3

        target = f"{uri.rstrip('/')}/config.json"
        raw = s3.get_bytes(client_factory(), target)
    elif (p := local_path(uri)) is not None:
        if not (p / "config.json").is_file():
            raise UserError(f"{where} ({p}) has no config.json")
        raw = (p / "config.json").read_bytes()
    elif "://" in uri:
        raise UserError(f"baseModel.uri: unsupported scheme in {uri!r} (use s3://, pvc:// or a hub id)")
    else:
        try:
            from huggingface_hub import hf_hub_download

            raw = Path(hf_hub_download(uri, "config.json", revision=cfg.base_model.revision)).read_bytes()
        except Exception as e:  # noqa: BLE001 - offline, gated, missing: the user must say where it is
            raise UserError(f"{where}: cannot fetch config.json from the hub: {type(e).__name__}: {e}") from None
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise UserError(f"{where}: config.json is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{where}: config.json is not a JSON object")
    return parsed


def fetch_tokenizer(cfg: TrainerConfig, client_factory: Callable[[], Any], dest: Path) -> Any:
    """The base model's tokenizer, downloading everything of an s3:// model but its weights."""
    from .model import load_tokenizer
    from .sources import model_source

    uri = cfg.base_model.uri
    if not is_s3(uri):
        return load_tokenizer(model_source(cfg, client_factory, dest), cfg)
    from . import s3

    client = client_factory()
    u = s3.parse_s3_uri(uri, field="baseModel.uri")
    keys = {
        o.key[len(u.dir_prefix) :]: s3.S3Uri(u.bucket, o.key)
        for o in s3.iter_objects(client, u)
        if not o.key.endswith("/") and not o.key.lower().endswith(WEIGHT_SUFFIXES)
    }
    if not keys:
        raise UserError(f"baseModel.uri: no tokenizer files under {uri}")
    s3.download_files(client, keys, dest)
    return load_tokenizer(str(dest), cfg)


def size_dataset(cfg: TrainerConfig, client_factory: Callable[[], Any], work: Path, tokenizer: Any) -> DatasetFacts:
    """One epoch of the training data: records (all), sequences and tokens (the sample's, scaled)."""
    from . import data as D
    from .sources import dataset_files

    t, ds = cfg.training, cfg.dataset
    files = dataset_files(ds.uri, client_factory, work / "data", "dataset.uri")
    enc = D.Encoder(ds, tokenizer, t.max_seq_length)
    examples: list[Any] = []
    records = sampled = 0
    for path, display in files:
        for _, rec in D.read_records(path, display):
            records += 1
            if sampled >= SAMPLE_RECORDS:
                continue
            sampled += 1
            if isinstance(rec, D.BadRecord):
                continue
            try:
                examples.append(enc(rec))
            except D.RecordError:
                continue
    if not examples:
        raise UserError(f"dataset.uri: no usable records in the first {sampled} of {records} at {ds.uri}")
    train = examples if ds.validation_uri else D.split_validation(examples, ds.validation_split, t.seed)[0]
    seqs = D.build_sequences(train, t.max_seq_length, t.packing)
    scale = records / sampled
    return DatasetFacts(
        records=records,
        sampled_records=sampled,
        sequences=round(len(seqs) * scale),
        tokens=round(sum(len(s) for s in seqs) * scale),
        counted="all" if sampled == records else "sample",
    )


def size(cfg: TrainerConfig, opts: TrainerOptions) -> SizingRecord:
    from . import s3

    started = time.monotonic()
    client: list[Any] = []

    def client_factory() -> Any:
        if not client:
            client.append(s3.make_client(cfg.s3))
        return client[0]

    model_cfg = read_model_config(cfg, client_factory)
    facts = config_facts(model_cfg)
    logs.log("sizing_model", uri=cfg.base_model.uri, **facts)
    dataset = None
    if cfg.training.max_steps is None:
        work = Path(opts.work_dir) / "sizing"
        tokenizer = fetch_tokenizer(cfg, client_factory, work / "tokenizer")
        dataset = size_dataset(cfg, client_factory, work, tokenizer)
        logs.log("sizing_dataset", uri=cfg.dataset.uri, **dataset.to_json_dict())
    return SizingRecord(phase="done", model_facts=facts, dataset=dataset, seconds=round(time.monotonic() - started, 2))


def report(record: SizingRecord, path: str) -> None:
    """One JSON line on stdout, and the termination message (cut to the kubelet's limit)."""
    text = json.dumps(record.to_json_dict(), separators=(",", ":"))
    if len(text.encode()) >= TERMINATION_LOG_LIMIT and record.message:
        record = record.model_copy(update={"message": record.message[: MESSAGE_MAX_CHARS // 2] + "..."})
        text = json.dumps(record.to_json_dict(), separators=(",", ":"))
    print(text, flush=True)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        logs.log("termination_log_unwritable", "warning", path=path, error=str(e))


def main(cfg: TrainerConfig, opts: TrainerOptions) -> int:
    try:
        record = size(cfg, opts)
        code = ExitCode.SUCCESS
    except KubetuneError as e:
        record, code = SizingRecord(phase="failed", message=str(e)[:MESSAGE_MAX_CHARS]), e.exit_code
    except Exception as e:  # noqa: BLE001 - unknown failures: the operator proceeds without an estimate
        text = f"sizing failed: {type(e).__name__}: {e}"
        record, code = SizingRecord(phase="failed", message=text[:MESSAGE_MAX_CHARS]), ExitCode.RETRIABLE
    logs.log("sizing_done" if code == ExitCode.SUCCESS else "sizing_failed", exit_code=int(code))
    report(record, opts.termination_log)
    return int(code)
