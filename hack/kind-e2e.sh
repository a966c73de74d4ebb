#!/usr/bin/env bash
# The end-to-end tests against a kind cluster, on a machine with a Docker engine (this project's
# build machines have none: there the tests boot their own node with kubetune_dev.stack).
#
#   hack/kind-e2e.sh            # create a kind cluster, build + load images, run tests/e2e
#   KEEP=1 hack/kind-e2e.sh     # leave the cluster up afterwards
#
# MinIO runs on this host (as in the local stack); kind nodes reach the host through the Docker
# bridge, so the host's IP on that bridge is what the FineTuneJobs use as their S3 endpoint.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
source "$here/versions.env"
CLUSTER=${CLUSTER:-kubetune-e2e}
VERSION=$(python3 -c 'import tomllib;print(tomllib.load(open("'"$repo"'/pyproject.toml","rb"))["project"]["version"])')
command -v docker >/dev/null || { echo "hack/kind-e2e.sh needs a Docker engine" >&2; exit 2; }
command -v kind >/dev/null || go install "sigs.k8s.io/kind@${KIND_VERSION:-v0.30.0}"

"$here/setup.sh"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --image "kindest/node:${KUBERNETES_VERSION}" --wait 120s
fi
kind get kubeconfig --name "$CLUSTER" > "$repo/.kind-kubeconfig"
trap '[ -n "${KEEP:-}" ] || kind delete cluster --name "$CLUSTER"' EXIT

# Spot label on the worker, as the local node has it.
kubectl --kubeconfig "$repo/.kind-kubeconfig" label node --all karpenter.sh/capacity-type=spot --overwrite
# Same Dockerfiles, the default (registry) base image; the lean CPU trainer image (as hack/images.sh trainer).
docker build -f "$repo/Dockerfile.operator" -t "localhost/kubetune-operator:$VERSION" "$repo"
docker build -f "$repo/Dockerfile.trainer" --build-arg EXTRAS=trainer,gpu --build-arg APT_PACKAGES= -t "localhost/kubetune-trainer:$VERSION" "$repo"
kind load docker-image --name "$CLUSTER" "localhost/kubetune-operator:$VERSION" "localhost/kubetune-trainer:$VERSION"

KUBETUNE_E2E_KUBECONFIG="$repo/.kind-kubeconfig" "${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/venv/bin/python" \
  -m pytest -q "$repo/tests/e2e"
