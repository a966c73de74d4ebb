"""Where the base model and the dataset come from: local/pvc paths, s3:// (downloaded to local
disk concurrently with kubetune_trainer.s3), or a hub id."""

from __future__ import annotations

from pathlib import Path

from kubetune_contract.config import TrainerConfig
from kubetune_contract.uris import is_s3, local_path_for_uri

from . import logs
from .errors import UserError


def local_path(uri: str) -> Path | None:
    """A local filesystem path for pvc://, file://, absolute or existing relative paths."""
    p = local_path_for_uri(uri)
    if p is not None:
        return Path(p)
    if "://" not in uri and Path(uri).exists():
        return Path(uri)
    return None


def model_source(cfg: TrainerConfig, client_factory, dest: Path, download: bool = True) -> str:
    """A local directory holding the base model, or a hub id for transformers to fetch.
    With download=False an s3:// model is only located (another process of the pod fetches it)."""
    uri = cfg.base_model.uri
    if is_s3(uri):
        if not download:
            return str(dest)
        from . import s3

        if dest.exists():
            import shutil

            shutil.rmtree(dest, ignore_errors=True)

        t0 = logs.monotonic()
        files = s3.download_prefix(client_factory(), uri, dest, field="baseModel.uri")
        logs.log(
            "model_downloaded",
            uri=uri,
            files=len(files),
            bytes=sum(f.stat().st_size for f in files),
            seconds=round(logs.monotonic() - t0, 2),
        )
        return str(dest)
    p = local_path(uri)
    if p is not None:
        if not p.is_dir():
            raise UserError(f"baseModel.uri: {uri} ({p}) is not a directory with a saved model")
        return str(p)
    if "://" in uri:
        raise UserError(f"baseModel.uri: unsupported scheme in {uri!r} (use s3://, pvc:// or a hub id)")
    return uri  # hub id


def dataset_files(uri: str, client_factory, dest: Path, field: str) -> list[tuple[Path, str]]:
    """[(local file, display name)] for a dataset URI (a file or a prefix/directory of files)."""
    from .data import is_data_file, local_data_files

    if is_s3(uri):
        from . import s3

        client = client_factory()
        u = s3.parse_s3_uri(uri, field=field)
        if is_data_file(u.key) and s3.head(client, u) is not None:
            keys = {u.name: u}
        else:
            objs = [o for o in s3.iter_objects(client, u) if is_data_file(o.key)]
            if not objs:
                raise UserError(f"{field}: no .jsonl or .parquet objects at {uri}")
            keys = {o.key[len(u.dir_prefix) :]: s3.S3Uri(u.bucket, o.key) for o in sorted(objs, key=lambda o: o.key)}
        s3.download_files(client, keys, dest)
        return [(dest / rel, str(src)) for rel, src in keys.items()]
    p = local_path(uri)
    if p is not None:
        return [(f, str(f)) for f in local_data_files(p)]
    if "://" in uri:
        raise UserError(f"{field}: unsupported scheme in {uri!r} (use s3://, pvc:// or a hub id)")
    return _hub_dataset(uri, dest, field)


def _hub_dataset(repo: str, dest: Path, field: str) -> list[tuple[Path, str]]:
    """A hub dataset, exported once to JSONL (needs the `datasets` package and network access)."""
    try:
        from datasets import load_dataset
    except Exception:
        raise UserError(
            f"{field}: {repo!r} looks like a hub dataset id, which needs the `datasets` "
            "package in the trainer image; use s3:// or pvc:// data instead"
        ) from None
    try:
        ds = load_dataset(repo, split="train")
    except Exception as e:
        raise UserError(f"{field}: cannot load hub dataset {repo!r}: {e}") from None
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "train.jsonl"
    ds.to_json(str(out), lines=True)
    return [(out, f"{repo}[train]")]
