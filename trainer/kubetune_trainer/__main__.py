"""`kubetune-train` / `python -m kubetune_trainer`: read the trainer config, train, exit with a
config.ExitCode (0 success, 1 retriable, 2 user error, 3 preempted with a durable checkpoint).
`python -m kubetune_trainer size`: the sizing pod's job instead (kubetune_trainer.size): the facts
the operator's right-sizing estimate needs, as a kubetune_contract.sizing.SizingRecord.

The environment is read here, once, into `options.TrainerOptions` (every variable and its default
is documented there), and passed down: KUBETUNE_CONFIG (default layout.CONFIG_PATH), RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT (pod rank and number of pods; see docs/design/trainer.md for
several GPUs per pod), KUBETUNE_METRICS_PORT (default 9400; 0 = any free port; "off"),
KUBETUNE_WORK_DIR (local scratch, default /tmp/kubetune), KUBETUNE_TERMINATION_LOG (default
/dev/termination-log), and the test/demo knobs of kubetune_contract.envvars.
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
    argv = sys.argv[1:] if argv is None else argv
    sizing = bool(argv) and argv[0] == "size"
    if sizing:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="kubetune-train", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--config", default=None, help=f"trainer config JSON (default: ${envvars.CONFIG}, else {CONFIG_PATH})"
    )
    ap.add_argument("--check-config", action="store_true", help="validate the config and exit")
    args = ap.parse_args(argv)

    from . import logs
    from .errors import KubetuneError
    from .options import TrainerOptions

    logs.disable_progress_bars()
    logs.capture_stdlib_logging()
    try:
        opts = TrainerOptions.from_environ(os.environ)  # the one read of this process's environment
    except KubetuneError as e:
        logs.log("failed", "error", error_type=type(e).__name__, message=str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    config_path = args.config or opts.config_path
    from kubetune_contract.config import TrainerConfig

    try:
        cfg = TrainerConfig.load(config_path)
    except Exception as e:  # noqa: BLE001
        msg = _config_error(config_path, e)
        logs.log("config_invalid", "error", message=msg, exit_code=int(ExitCode.USER_ERROR))
        _write_failure(opts.termination_log, msg)
        return int(ExitCode.USER_ERROR)
    if args.check_config:
        logs.log("config_ok", path=config_path)
        return 0
    if sizing:
        from .size import main as size_main

        return size_main(cfg, opts)

    from .launch import maybe_launch_local_workers

    launched = maybe_launch_local_workers(cfg, opts, os.environ)
    if launched is not None:
        return int(launched)

    from .train import run

    try:
        code = run(cfg, opts)
    except KubetuneError as e:
        logs.log("failed", "error", error_type=type(e).__name__, message=str(e), exit_code=int(e.exit_code))
        return int(e.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.PREEMPTED)
    except BaseException as e:  # noqa: BLE001 - unknown failures are retried
        logs.log(
            "crashed",
            "error",
            error_type=type(e).__name__,
            message=str(e),
            traceback=traceback.format_exc()[-4000:],
            exit_code=int(ExitCode.RETRIABLE),
        )
        return int(ExitCode.RETRIABLE)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
