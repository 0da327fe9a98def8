#!/usr/bin/env bash
# Pin every image by digest, so two nodes of one cluster can never run different code:
#   cluster/pin_images.sh REGISTRY/selfsup      resolve the Ray base image's digest, build and push
#                                               selfsup's image, write both digests into
#                                               cluster/Dockerfile and the KubeRay manifests, and the
#                                               GCP Deep Learning VM images of the families we use
#                                               into cluster/gcp.yaml (needs docker with buildx, gcloud)
#   cluster/pin_images.sh --constraints         rewrite cluster/constraints.txt (the tested set: README,
#                                               CI and nodes install with it) from .venv, after the tests
#                                               passed in it
# Run from the repository root; review the diff, run `python -m cluster.checks`, commit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--constraints" ]]; then
  {
    echo "# The tested set: the environment the test suite passed in (pip freeze of '.[test]', which holds every"
    echo "# extra; Python 3.11, Linux x86_64). The README's install commands, CI (.ci/run), node setup and the"
    echo "# image install with -c this file, so every install runs these versions; tests/test_lockfile.py checks"
    echo "# it against pyproject.toml. Refresh after a dependency change: cluster/pin_images.sh --constraints"
    echo "# (writes this file from .venv), then run the suite in a venv installed with it."
    .venv/bin/pip freeze --exclude-editable | grep -v '^selfsup'
  } > cluster/constraints.txt
  echo "cluster/constraints.txt: $(grep -c '==' cluster/constraints.txt) pins"
  exit 0
fi

image="${1:?usage: cluster/pin_images.sh REGISTRY/selfsup | --constraints}"
base_tag="$(sed -n 's/^FROM \([^@ ]*\).*/\1/p' cluster/Dockerfile)"
base_digest="$(docker buildx imagetools inspect "$base_tag" --format '{{.Manifest.Digest}}')"
[[ "$base_digest" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "pin_images: no digest for $base_tag: $base_digest" >&2; exit 1; }
sed -i "s|^FROM ${base_tag}[^ ]*|FROM ${base_tag}@${base_digest}|" cluster/Dockerfile

docker build -f cluster/Dockerfile -t "${image}:build" .
docker push "${image}:build"
pushed="$(docker inspect --format '{{index .RepoDigests 0}}' "${image}:build")"   # REGISTRY/selfsup@sha256:…
[[ "$pushed" =~ @sha256:[0-9a-f]{64}$ ]] || { echo "pin_images: no digest after push: $pushed" >&2; exit 1; }
sed -i -E "s|image: [^ ]*selfsup@sha256:[^ ]*|image: ${pushed}|" cluster/kuberay-raycluster.yaml cluster/kuberay-rayjob.yaml

for family in common-cu124-ubuntu-2204-py310 common-cpu-ubuntu-2204-py310; do
  name="$(gcloud compute images describe-from-family "$family" --project deeplearning-platform-release --format='value(name)')"
  sed -i -E "s#(sourceImage: [^ ]*/images/)[^ ]*(  \# family: ${family})\$#\1${name}\2#" cluster/gcp.yaml
done
echo "pinned: ${base_tag}@${base_digest}, ${pushed}"
