#!/usr/bin/env bash
# Build the Helm CLI from its Go module into the cache, once: `make test` renders the
# chart in deploy/helm/tally with it (tests/unit/deploy/test_helm_chart.py) and validates the
# output against the Kubernetes schemas shipped by the kubernetes-validate package, so
# no cluster and no network access to schema stores is needed.
#
#   scripts/helm.sh          print the path of a working helm, building it if missing
#
# Needs Go (1.22+) and the Go module proxy; the build is bounded (HELM_BUILD_TIMEOUT_S,
# default 900 s: the first one downloads ~300 modules and compiles for a few minutes).
# The binary lives in $TALLY_CACHE_DIR/bin (default <repo>/.cache/bin), the module
# cache in $TALLY_CACHE_DIR/go; delete them to rebuild.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.16.4}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR=$(realpath -m "${TALLY_CACHE_DIR:-$REPO_ROOT/.cache}")
BIN="$CACHE_DIR/bin/helm"

if [[ -x "$BIN" ]] && "$BIN" version --short 2>/dev/null | grep -q "^${HELM_VERSION%.*}"; then
    echo "$BIN"
    exit 0
fi
if ! command -v go >/dev/null; then
    echo "scripts/helm.sh: no Go toolchain on PATH; install Go to build helm $HELM_VERSION" >&2
    exit 1
fi
mkdir -p "$CACHE_DIR/bin" "$CACHE_DIR/go"
echo "scripts/helm.sh: building helm $HELM_VERSION (once, into $CACHE_DIR/bin)" >&2
(
    cd "$CACHE_DIR"
    GOPATH="$CACHE_DIR/go" GOBIN="$CACHE_DIR/bin" GOFLAGS=-mod=mod \
        timeout "${HELM_BUILD_TIMEOUT_S:-900}" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
)
"$BIN" version --short >&2
echo "$BIN"
