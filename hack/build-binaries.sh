#!/usr/bin/env bash
# Builds the pinned upstream binaries kubetune's tests and demo need, from the Go module proxy,
# into a cache outside the repo ($KUBETUNE_CACHE/bin/<name>-<version>/). Idempotent: a binary
# that is already there is not rebuilt.
#   hack/build-binaries.sh [kubernetes|etcd|kwok|minio|helm|prometheus|monitoring-crds|all ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
export GOCACHE=${GOCACHE:-$CACHE/go-build} GOMODCACHE=${GOMODCACHE:-$CACHE/go-mod}
mkdir -p "$CACHE/bin" "$CACHE/src"

log() { echo "[build-binaries] $*" >&2; }
have() { [ -x "$1" ] && { log "cached: $1"; return 0; } || return 1; }

# A throwaway wrapper module per tool keeps their dependency graphs apart.
wrapper() {  # name -> prints a fresh module dir
  local d="$CACHE/src/$1"; rm -rf "$d"; mkdir -p "$d"; (cd "$d" && go mod init "kubetune.local/build/$1" >/dev/null 2>&1); echo "$d"
}

build_kubernetes() {
  local v=$KUBERNETES_VERSION out="$CACHE/bin/kubernetes-$KUBERNETES_VERSION"
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kube-proxy)
  local missing=0; for c in "${cmds[@]}"; do [ -x "$out/$c" ] || missing=1; done
  [ $missing = 0 ] && { log "cached: $out"; return; }
  local d; d=$(wrapper kubernetes); cd "$d"
  local minor=${v#v1.}; local staging_v="v0.${minor}"
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging
  # paths; point every one of them at the published v0.X.Y instead (derived, not hard-coded).
  local gomod; gomod=$(go mod download -json "k8s.io/kubernetes@$v" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
  go mod edit -require="k8s.io/kubernetes@$v"
  for m in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace="$m=$m@$staging_v"
  done
  local pkgs=(); for c in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  printf 'package tools\nimport (\n' > tools.go; for p in "${pkgs[@]}"; do printf '\t_ "%s"\n' "$p" >> tools.go; done; printf ')\n' >> tools.go
  go mod tidy >/dev/null 2>&1 || true
  local major=1 minor_only=${minor%%.*}
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor_only -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  mkdir -p "$out.tmp"
  for c in "${cmds[@]}"; do
    [ -x "$out.tmp/$c" ] && continue
    log "building $c $v (slow on a cold cache)"
    go build -trimpath -ldflags "$ld" -o "$out.tmp/$c" "k8s.io/kubernetes/cmd/$c"
  done
  rm -rf "$out"; mv "$out.tmp" "$out"
  # pause.c ships in the module; the local node's sandbox image is built from it (hack/images.sh).
  cp "$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c" "$out/pause.c"
}

build_go_main() {  # name version module-path-of-main-package module-to-get
  local name=$1 v=$2 pkg=$3 mod=$4 out="$CACHE/bin/$1-$2"
  have "$out/$name" && return
  local d; d=$(wrapper "$name"); cd "$d"
  log "building $name $v"
  go get "$mod@$v" >/dev/null
  mkdir -p "$out"
  go build -trimpath -ldflags "-s -w" -o "$out/$name.tmp" "$pkg"
  mv "$out/$name.tmp" "$out/$name"
}

build_etcd() { build_go_main etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3; }
build_kwok() { build_go_main kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok sigs.k8s.io/kwok; }
# Not a binary: the prometheus-operator's CRDs for the kinds the chart can create, from its module.
build_monitoring_crds() {
  local v=$PROMETHEUS_OPERATOR_VERSION out="$CACHE/bin/monitoring-crds-$PROMETHEUS_OPERATOR_VERSION"
  local kinds=(servicemonitors podmonitors prometheusrules)
  [ -f "$out/monitoring.coreos.com_prometheusrules.yaml" ] && { log "cached: $out"; return; }
  log "fetching prometheus-operator $v CRDs"
  local dir; dir=$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$v" | python3 -c 'import json,sys;print(json.load(sys.stdin)["Dir"])')
  mkdir -p "$out.tmp"
  for k in "${kinds[@]}"; do cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$k.yaml" "$out.tmp/"; done
  chmod -R u+w "$out.tmp"; rm -rf "$out"; mv "$out.tmp" "$out"
}

build_helm() {
  local out="$CACHE/bin/helm-$HELM_VERSION"
  have "$out/helm" && return
  local d; d=$(wrapper helm); cd "$d"
  log "building helm $HELM_VERSION"
  go get "helm.sh/helm/v3@$HELM_VERSION" >/dev/null
  # As helm's Makefile does: its own version, and the Kubernetes version `helm template` and
  # `helm lint` assume (from its client-go), or charts with a kubeVersion constraint fail.
  local kv; kv=$(go list -m -f '{{.Version}}' k8s.io/client-go)  # v0.34.x
  local kminor; kminor=$(echo "$kv" | cut -d. -f2)
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$kminor"
  done
  mkdir -p "$out"
  go build -trimpath -ldflags "$ld" -o "$out/helm.tmp" helm.sh/helm/v3/cmd/helm
  mv "$out/helm.tmp" "$out/helm"
}
build_minio() { build_go_main minio "$MINIO_VERSION" github.com/minio/minio github.com/minio/minio; }
build_prometheus() {  # the server and promtool (`promtool check metrics`), one module, one wrapper
  local out="$CACHE/bin/prometheus-$PROMETHEUS_VERSION" m=github.com/prometheus/prometheus
  [ -x "$out/prometheus" ] && [ -x "$out/promtool" ] && { log "cached: $out"; return; }
  local d; d=$(wrapper prometheus); cd "$d"
  log "building prometheus + promtool $PROMETHEUS_VERSION (slow on a cold cache)"
  go get "$m@$PROMETHEUS_VERSION" >/dev/null
  # Its Go module versions encode 3.x.y as v0.3xx.y (v0.306.0 is Prometheus 3.6.0); stamp the
  # release version into `--version` and prometheus_build_info, as its Makefile (promu) does.
  local mm=${PROMETHEUS_VERSION#v0.}; local release="$((${mm%%.*} / 100)).$((${mm%%.*} % 100)).${mm#*.}"
  local ld="-s -w -X github.com/prometheus/common/version.Version=$release -X github.com/prometheus/common/version.Branch=HEAD"
  mkdir -p "$out"
  for c in prometheus promtool; do
    [ -x "$out/$c" ] && continue
    go build -trimpath -ldflags "$ld" -o "$out/$c.tmp" "$m/cmd/$c"
    mv "$out/$c.tmp" "$out/$c"
  done
}

targets=("$@"); [ ${#targets[@]} = 0 ] && targets=(all)
for t in "${targets[@]}"; do
  case $t in
    all) build_etcd; build_kubernetes; build_kwok; build_minio; build_helm; build_prometheus ;;
    kubernetes|etcd|kwok|minio|helm|prometheus) "build_$t" ;;
    monitoring-crds) build_monitoring_crds ;;
    *) echo "unknown target: $t" >&2; exit 2 ;;
  esac
done
