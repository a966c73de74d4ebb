"""`kubetune-train` / `python -m kubetune_trainer`: read the trainer config, train, exit with a
config.ExitCode (0 success, 1 retriable, 2 user error, 3 preempted with a durable checkpoint).

Environment: KUBETUNE_CONFIG (default config.CONFIG_PATH), RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT (pod rank and number of pods; see docs/design/trainer.md for several GPUs per pod),
KUBETUNE_METRICS_PORT (default 9400; 0 = any free port; "off"), KUBETUNE_WORK_DIR (local scratch,
default /tmp/kubetune), KUBETUNE_TERMINATION_LOG (default /dev/termination-log).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from kubetune_contract import envvars
from kubetune_contract.layout import CONFIG_PATH, MESSAGE_MAX_CHARS
from kubetune_contract.progress import ExitCode, ProgressRecord


def _config_error(path: str, exc: BaseException) -> str:
    try:
        from pydantic import ValidationError
    except Exception:  # pragma: no cover
        ValidationError = ()  # type: ignore
    if isinstance(exc, FileNotFoundError):
        return f"trainer config {path} not found (set {envvars.CONFIG} or mount the ConfigMap at {CONFIG_PATH})"
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:10]:
            loc = ".".join(str(x) for x in err.get("loc", ())) or "(root)"
            parts.append(f"{loc}: {err.get('msg')}")
        return f"trainer config {path} is invalid: " + "; ".join(parts)
    return f"trainer config {path} is unreadable: {type(exc).__name__}: {exc}"


def _write_failure(path: str, message: str) -> None:
    try:
        rec = ProgressRecord(phase="failed", message=message[:MESSAGE_MAX_CHARS])
        with open(path, "w") as f:
            f.write(rec.model_dump_json(by_alias=True, exclude_none=True))
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kubetune-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.environ.get(envvars.CONFIG, CONFIG_PATH), help="trainer config JSON")
    ap.add_argument("--check-config", action="store_true", help="validate the config and exit")
    args = ap.parse_args(argv)

    from . import logs
    from .errors import KubetuneError
    from .train import RunOptions

    logs.disable_progress_bars()
    logs.capture_stdlib_logging()
    opts = RunOptions.from_environ()
    from kubetune_contract.config import TrainerConfig

    try:
        cfg = TrainerConfig.load(args.config)
    except Exception as e:  # noqa: BLE001
        msg = _config_error(args.config, e)
        logs.log("config_invalid", "error", message=msg, exit_code=int(ExitCode.USER_ERROR))
        _write_failure(opts.termination_log, msg)
        return int(ExitCode.USER_ERROR)
    if args.check_config:
        logs.log("config_ok", path=args.config)
        return 0

    from .launch import maybe_launch_local_workers

    code = maybe_launch_local_workers(cfg)
    if code is not None:
        return int(code)

    from .train import run

    try:
        code = run(cfg, opts)
    except KubetuneError as e:
        logs.log("failed", "error", error_type=type(e).__name__, message=str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.PREEMPTED)
    except BaseException as e:  # noqa: BLE001 - unknown failures are retried
        logs.log("crashed", "error", error_type=type(e).__name__, message=str(e),
                 traceback=traceback.format_exc()[-4000:], exit_code=int(ExitCode.RETRIABLE))
        return int(ExitCode.RETRIABLE)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
