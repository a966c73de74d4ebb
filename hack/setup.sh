#!/usr/bin/env bash
# Everything `make test` and `make demo` need on a fresh machine, cached outside the repo:
# a virtualenv with pinned Python packages, and pinned upstream binaries built from the Go
# module proxy. A second run only checks the caches.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
VENV=$CACHE/venv
mkdir -p "$CACHE"

need_cmd() { command -v "$1" >/dev/null 2>&1; }
if ! need_cmd openssl || ! need_cmd go || ! need_cmd ip; then
  echo "[setup] installing Debian packages: openssl iproute2" >&2
  apt-get update -qq && apt-get install -y -qq openssl iproute2 >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Reinstall only when the pins or the package metadata changed.
stamp=$( (echo "$repo"; cat "$repo/hack/constraints.txt" "$repo/pyproject.toml") | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.kubetune-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "[setup] installing Python packages into $VENV (torch from PyPI is large: first run takes minutes)" >&2
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -c "$repo/hack/constraints.txt" -e "$repo[dev]"
  # DeepSpeed (the trainer's ZeRO tests run it on CPU over gloo): an sdist whose setup.py imports
  # torch, so it builds against the torch just installed, without build isolation; no ops are
  # compiled (DS_BUILD_OPS=0): the presets use torch_adam.
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q -c "$repo/hack/constraints.txt" --no-build-isolation deepspeed
  echo "$stamp" > "$VENV/.kubetune-stamp"
fi

"$here/build-binaries.sh" etcd kubernetes kwok minio helm prometheus monitoring-crds
echo "[setup] ready: $VENV, binaries in $CACHE/bin" >&2
