"""`kubetune-operator`: run the kopf operator (handlers in kubetune_operator.handlers).

The entry point reads the settings from the environment, once, and hands them to kopf's memo;
handlers.startup builds the operator context from them."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys

import kopf

from .settings import Settings


def main(argv: list[str] | None = None) -> int:
    from . import handlers  # noqa: F401  (registers the handlers with kopf's default registry)

    settings = Settings.from_env()
    ap = argparse.ArgumentParser(prog="kubetune-operator", description="Run the kubetune FineTuneJob operator.")
    ap.add_argument(
        "--namespace",
        default=settings.watch_namespace or None,
        help="watch one namespace (default: all; env KUBETUNE_WATCH_NAMESPACE)",
    )
    ap.add_argument("--log-format", choices=["json", "plain"], default="json")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    liveness = f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            standalone=True,  # one replica (the chart's Deployment uses the Recreate strategy)
            # kopf would derive this from the user name; a numeric non-root uid has no passwd entry.
            identity=f"kubetune-operator@{socket.gethostname()}/{os.getpid()}",
            clusterwide=args.namespace is None,
            namespaces=[args.namespace] if args.namespace else (),
            liveness_endpoint=liveness,
            memo=kopf.Memo(settings=settings),
        )
    )
    return 0


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout)
    sys.exit(main())
