#!/usr/bin/env bash
# Builds kubetune's container images without Docker or a registry, and loads them into a local
# node's containerd (kubetune_dev.node). Pinned versions come from hack/versions.env.
#
#   hack/images.sh [options] TARGET...
#     base                     Debian ($DEBIAN_SUITE, debootstrap minbase) + python3 + a venv at
#                              /opt/venv on PATH, as $BASE_IMAGE; rootfs tarball cached
#     operator | trainer       buildah bud -f Dockerfile.<name> --build-arg BASE_IMAGE=$BASE_IMAGE
#                              -t localhost/kubetune-<name>:<version>, then export + load; `trainer`
#                              is the lean CPU image (EXTRAS=trainer,gpu, no apt packages)
#     trainer-gpu              Dockerfile.trainer's defaults, the GPU image (+ qlora, deepspeed, liger,
#                              datasets, gcc): localhost/kubetune-trainer-gpu:<version>; shares the
#                              torch layer with `trainer`. apt reaches Debian ($DEBIAN_MIRROR) in its build
#     all                      base operator trainer
#     wheelhouse               pip download every pin of hack/constraints.txt (torch included)
#                              into the wheelhouse, with the base image's pip
#     build NAME DOCKERFILE [CONTEXT]   the same for any Dockerfile (context: the repo root)
#     load IMAGE|ARCHIVE...    export a buildah image (or take an archive) and import it
#   options:
#     --state-dir DIR          load into the local node of this state dir (<DIR>/node/node.json)
#     --address SOCK           load into the containerd listening on SOCK ($CONTAINERD_ADDRESS)
#     --no-load                build (and keep in buildah's storage) only
#     --version V              tag for operator/trainer (default: pyproject.toml's version)
#
# Caches (outside the repo, under $KUBETUNE_CACHE, default ~/.cache/kubetune):
#   images/base-<suite>-<key>.tar   the base rootfs (rebuilt only when suite/packages change)
#   images/debs/                    debootstrap's .deb cache
#   wheelhouse/<base tag>/          every pin of hack/constraints.txt (+ setuptools, wheel), mounted
#                                   read-only at /wheelhouse during every RUN with a build-time
#                                   /etc/pip.conf `no-index = true, find-links = /wheelhouse`:
#                                   torch & co. are downloaded once, not per build, and builds are
#                                   reproducible. Refreshed when constraints.txt changes; set
#                                   WHEELHOUSE= (empty) to build online instead. (pip's HTTP cache
#                                   can't do it here: the egress proxy strips caching headers.)
#   pip-cache/                      mounted at /root/.cache/pip during every RUN (locally built
#                                   wheels of sdists; Dockerfiles must not pass --no-cache-dir)
#   images/<name>_<tag>.docker.tar  exported archives (uncompressed docker-archive), re-exported
#                                   only when the image ID changes
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
IMAGES=$CACHE/images
PIP_CACHE=$CACHE/pip-cache
WHEELHOUSE=${WHEELHOUSE-$CACHE/wheelhouse/${BASE_IMAGE##*:}}  # WHEELHOUSE= builds online
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates,tzdata
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-oci}
mkdir -p "$IMAGES" "$PIP_CACHE"

log() { echo "[images] $*" >&2; }
die() { echo "[images] error: $*" >&2; exit 1; }
now() { date +%s; }

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v ctr >/dev/null || missing+=(containerd)
  [ ${#missing[@]} = 0 ] && return
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }
# The image a rebuild replaced keeps its layers (6 GB for the trainer) as a dangling image; drop it
# unless something still names it. Only that leaf goes: the --layers cache it shares stays.
remove_replaced() {  # previous_id new_id
  [ -n "$1" ] && [ "$1" != "$2" ] || return 0
  if buildah images --noheading --format '{{.ID}} {{.Name}}' | awk -v id="${1:0:12}" '$1 == id && $2 != "<none>"' | grep -q .; then
    return 0
  fi
  buildah rmi "$1" >/dev/null 2>&1 && log "removed the replaced image ${1:0:12}" || true
}
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
image_label() { buildah inspect --type image --format "{{index .ImageAnnotations \"$2\"}}{{index .OCIv1.Config.Labels \"$2\"}}" "$1" 2>/dev/null || true; }

# ---- (a) the base image ------------------------------------------------------------------------
build_base() {
  local key t0 tarball rootfs
  key=$(printf '%s\n' "v1" "$DEBIAN_SUITE" "$DEBIAN_MIRROR" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
  tarball=$IMAGES/base-$DEBIAN_SUITE-$key.tar
  if [ ! -f "$tarball" ]; then
    t0=$(now)
    rootfs=$IMAGES/base-rootfs.tmp
    cleanup_rootfs() {  # debootstrap mounts proc/sys inside; never rm -rf through a mount
      local m; for m in $(awk -v r="$rootfs" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r); do umount -l "$m" || true; done
      rm -rf "$rootfs"
    }
    cleanup_rootfs; trap cleanup_rootfs EXIT
    mkdir -p "$IMAGES/debs"
    log "debootstrap $DEBIAN_SUITE (minbase + $BASE_PACKAGES)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$IMAGES/debs" \
      "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" > "$IMAGES/debootstrap.log" 2>&1 \
      || { tail -20 "$IMAGES/debootstrap.log" >&2; die "debootstrap failed (log: $IMAGES/debootstrap.log)"; }
    # Debian's python is "externally managed" (PEP 668): give images a venv that is first on PATH,
    # so Dockerfiles can `pip install` as usual.
    chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
    chroot "$rootfs" /opt/venv/bin/python -m pip --version >/dev/null
    cleanup_mounts_only() { local m; for m in $(awk -v r="$rootfs" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done; }
    cleanup_mounts_only
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* "$rootfs"/dev/* \
      "$rootfs"/tmp/* "$rootfs"/root/.cache
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    cleanup_rootfs; trap - EXIT
    log "base rootfs $(du -h "$tarball" | cut -f1) in $(( $(now) - t0 ))s: $tarball"
  fi
  if image_exists "$BASE_IMAGE" && [ "$(image_label "$BASE_IMAGE" io.kubetune.base-key)" = "$key" ]; then
    log "cached: $BASE_IMAGE"
    return
  fi
  t0=$(now)
  local c; c=$(buildah from scratch)
  buildah add --quiet "$c" "$tarball" / >/dev/null
  buildah config \
    --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env VIRTUAL_ENV=/opt/venv --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 \
    --env PIP_DISABLE_PIP_VERSION_CHECK=1 \
    --cmd '["python3"]' --workingdir / \
    --label io.kubetune.base-key="$key" \
    --label org.opencontainers.image.description="kubetune base: Debian $DEBIAN_SUITE + python3 + /opt/venv" \
    "$c"
  buildah commit --quiet --rm "$c" "$BASE_IMAGE" >/dev/null
  log "built $BASE_IMAGE in $(( $(now) - t0 ))s"
}

# Build-time only mounts (never in a layer): pip's cache; the wheelhouse as pip find-links; the
# host's CA bundle + a pip.conf using it, so RUN steps get through a TLS-intercepting egress proxy
# the way the host does. Sets the array `vols`.
build_volumes() {  # [with_wheelhouse=1]
  vols=(--volume "$PIP_CACHE:/root/.cache/pip")
  local conf=$IMAGES/build-pip.conf
  printf '[global]\n' > "$conf"
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    printf 'cert = /etc/ssl/certs/ca-certificates.crt\n' >> "$conf"
    vols+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  fi
  if [ "${1:-1}" = 1 ] && [ -n "$WHEELHOUSE" ]; then
    # offline: with the index still on, pip 23 downloads torch again even when the same wheel is
    # in find-links; so no index at all, and the wheelhouse must hold every pin (it does: it is
    # refreshed whenever hack/constraints.txt changes, see ensure_wheelhouse)
    printf 'no-index = true\nfind-links = /wheelhouse\n' >> "$conf"
    vols+=(--volume "$WHEELHOUSE:/wheelhouse:ro")
  fi
  vols+=(--volume "$conf:/etc/pip.conf:ro")
}

# ---- the wheelhouse: every pin of hack/constraints.txt, downloaded by the base image's own pip
# (same interpreter and platform tags as the images), reused by every later build
build_wheelhouse() {
  local t0 c reqs; t0=$(now)
  image_exists "$BASE_IMAGE" || build_base
  mkdir -p "$WHEELHOUSE"
  reqs=$IMAGES/wheelhouse-requirements.txt
  grep -E '^[A-Za-z0-9_.-]+==' "$here/constraints.txt" > "$reqs"
  # build backends that `pip install .` fetches into its isolated build env (unless pinned above)
  local tool; for tool in setuptools wheel; do grep -qi "^$tool==" "$reqs" || echo "$tool" >> "$reqs"; done
  local vols; build_volumes 0
  c=$(buildah from --quiet "$BASE_IMAGE")
  log "pip download $(wc -l < "$reqs") pins into $WHEELHOUSE"
  buildah run --network host "${vols[@]}" --volume "$WHEELHOUSE:/wheelhouse" --volume "$reqs:/tmp/requirements.txt:ro" \
    "$c" -- pip download --quiet --no-deps --dest /wheelhouse -r /tmp/requirements.txt \
    || { buildah rm "$c" >/dev/null; die "pip download failed"; }
  buildah rm "$c" >/dev/null
  wheelhouse_key > "$WHEELHOUSE.key"
  log "wheelhouse $(du -sh "$WHEELHOUSE" | cut -f1) in $(( $(now) - t0 ))s"
}

wheelhouse_key() { cat "$here/constraints.txt" | sha256sum | cut -c1-16; }
ensure_wheelhouse() {
  [ -n "$WHEELHOUSE" ] || return 0
  [ "$(cat "$WHEELHOUSE.key" 2>/dev/null)" = "$(wheelhouse_key)" ] || build_wheelhouse
}

# ---- (b) application images ----------------------------------------------------------------------
build_image() {  # name dockerfile [context]; extra `buildah bud` arguments in the array BUD_ARGS
  local name=$1 file=$2 context=${3:-$repo} tag t0
  tag=localhost/kubetune-$name:$VERSION
  [ -f "$file" ] || die "$file not found"
  image_exists "$BASE_IMAGE" || build_base
  ensure_wheelhouse
  t0=$(now)
  log "buildah bud -f $file -t $tag"
  # --network host: RUN steps need PyPI, and buildah's default CNI network would bring up
  # cni-podman0 on 10.88.0.0/16 on the host (the node avoids that range and removes the bridge).
  # --layers: unchanged steps (the big dependency install) are reused between builds.
  # Build-time only (never in a layer): pip's cache, and the host's CA bundle + a pip.conf using
  # it, so RUN steps get through a TLS-intercepting egress proxy the way the host does.
  local vols; build_volumes
  local previous; previous=$(image_id "$tag")
  buildah bud --layers --network host \
    --build-arg BASE_IMAGE="$BASE_IMAGE" "${vols[@]}" ${BUD_ARGS[@]+"${BUD_ARGS[@]}"} \
    -f "$file" -t "$tag" "$context" >&2
  log "built $tag in $(( $(now) - t0 ))s"
  remove_replaced "$previous" "$(image_id "$tag")"
  BUILT+=("$tag")
}

# ---- (c) export + load into containerd -------------------------------------------------------------
containerd_address() {
  if [ -n "$ADDRESS" ]; then echo "$ADDRESS"; return; fi
  if [ -n "$STATE_DIR" ]; then
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["containerd_address"])' "$STATE_DIR/node/node.json"
    return
  fi
  die "where to load? pass --state-dir DIR (a local node's state dir) or --address SOCK (or --no-load)"
}

snapshotter() {
  if [ -n "$STATE_DIR" ] && [ -f "$STATE_DIR/node/node.json" ]; then
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("snapshotter","overlayfs"))' "$STATE_DIR/node/node.json"
  else echo overlayfs; fi
}

export_image() {  # image -> prints the archive path (re-exported only when the image ID changed)
  local img=$1 id archive t0
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$img")
  archive=$IMAGES/$(echo "${img#localhost/}" | tr '/:' '__').docker.tar
  if [ -f "$archive" ] && [ "$(cat "$archive.id" 2>/dev/null)" = "$id" ]; then
    echo "$archive"; return
  fi
  t0=$(now)
  rm -f "$archive" "$archive.id"
  # docker-archive, uncompressed: buildah 1.28 gzips oci-archive layers even with -D, and gzip of
  # multi-GB torch layers costs minutes on 2 cores; the archive never leaves this machine
  buildah push --quiet --disable-compression "$img" "docker-archive:$archive:$img" >&2
  echo "$id" > "$archive.id"
  log "exported $img ($(du -h "$archive" | cut -f1)) in $(( $(now) - t0 ))s"
  echo "$archive"
}

load_archive() {  # archive
  local addr t0; t0=$(now)
  if [ -n "$STATE_DIR" ] && [ -z "$ADDRESS" ]; then
    # through the node: it remembers what it imported (skips the same archive next time)
    PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 -m kubetune_dev.imagestore import --state-dir "$STATE_DIR" "$1"
    return
  fi
  addr=$(containerd_address)
  ctr --address "$addr" -n k8s.io images import --snapshotter "$(snapshotter)" "$1" >&2
  log "imported $(basename "$1") into $addr in $(( $(now) - t0 ))s"
}

load() {
  local x
  for x in "$@"; do
    if [ -f "$x" ]; then load_archive "$x"; else load_archive "$(export_image "$x")"; fi
  done
}

# ---- main -----------------------------------------------------------------------------------------
STATE_DIR=${STATE_DIR:-} ADDRESS=${CONTAINERD_ADDRESS:-} NO_LOAD=0 VERSION=${VERSION:-}
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --state-dir) STATE_DIR=$2; shift 2 ;;
    --address) ADDRESS=$2; shift 2 ;;
    --no-load) NO_LOAD=1; shift ;;
    --version) VERSION=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ ${#args[@]} -gt 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
[ -n "$VERSION" ] || VERSION=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' "$repo/pyproject.toml" | head -1)
ensure_tools
BUILT=() BUD_ARGS=()
set -- "${args[@]}"
while [ $# -gt 0 ]; do
  case $1 in
    base) build_base; shift ;;
    wheelhouse) build_wheelhouse; shift ;;
    operator|trainer)
      BUD_ARGS=()
      # Dockerfile.trainer's defaults are the GPU image; the `trainer` target is the lean CPU one
      [ "$1" = trainer ] && BUD_ARGS=(--build-arg EXTRAS=trainer,gpu --build-arg APT_PACKAGES=)
      if [ -f "$repo/Dockerfile.$1" ]; then build_image "$1" "$repo/Dockerfile.$1"; else log "skip $1: no Dockerfile.$1"; fi
      BUD_ARGS=(); shift ;;
    trainer-gpu) BUD_ARGS=(); build_image trainer-gpu "$repo/Dockerfile.trainer"; shift ;;
    all) set -- base operator trainer "${@:2}" ;;
    build) [ $# -ge 3 ] || die "build NAME DOCKERFILE [CONTEXT]"
      if [ $# -ge 4 ] && [ -d "$4" ]; then build_image "$2" "$3" "$4"; shift 4; else build_image "$2" "$3"; shift 3; fi ;;
    load) shift; [ $# -gt 0 ] || die "load IMAGE|ARCHIVE..."; load "$@"; exit 0 ;;
    *) die "unknown target: $1" ;;
  esac
done
if [ "$NO_LOAD" = 0 ] && [ ${#BUILT[@]} -gt 0 ]; then
  load "${BUILT[@]}"
fi
