#!/usr/bin/env bash
# Installs the Debian packages the tests need (tests/functional/test_deploy.py):
#   gcc        the C compiler of `pip install -e .`'s mypyc build (setup.py)
#   promtool   `promtool check config|rules`, `promtool test rules` on deploy/prometheus/
#              (Debian package `prometheus`, which also brings the server the
#              scenario tests run)
#   chromium   headless Chromium renders /status (tests/functional/test_status.py)
#   htpasswd   bcrypt htpasswd files for client_auth (tests/*/test_client_auth*.py,
#              tests/unit/test_auth.py; Debian package `apache2-utils`)
# Idempotent: checks each command with `command -v` and runs `apt-get update`
# once, only when something is missing. Needs root (or sudo) for apt-get.
#   scripts/debian-deps.sh
#
# Not from Debian: kustomize. Debian has no kustomize or kubeconform package,
# and its `kubernetes-client` (kubectl 1.20) embeds kustomize v2, too old for
# deploy/kubernetes/. The tests use `kustomize` (tools folder or PATH) or,
# failing that, `kubectl kustomize`; without either they still validate the
# kustomize tree structurally in Python.
set -euo pipefail

# command | Debian package that provides it
WANTED=(
    "gcc|gcc"             # pip install compiles the per-request modules (mypyc, setup.py)
    "promtool|prometheus"
    "nginx|nginx-light"   # static GOPROXY upstreams in e2e tests and bench/
    "wrk|wrk"             # bench/ load generator
    "chromium|chromium"   # /status rendered headless: DOM and screenshot
    "htpasswd|apache2-utils"  # client_auth tests: htpasswd files made by Apache's own tool
)

have() { command -v "$1" >/dev/null 2>&1; }
log() { echo "debian-deps: $*" >&2; }

missing=()
for entry in "${WANTED[@]}"; do
    IFS='|' read -r cmd pkg <<<"$entry"
    if have "$cmd"; then
        log "$cmd: present ($(command -v "$cmd"))"
    else
        missing+=("$pkg")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    have sudo || { log "need root or sudo for apt-get (missing: ${missing[*]})"; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
$SUDO apt-get update -qq
log "installing ${missing[*]}"
# --no-install-recommends: the prometheus package recommends the node exporter
# and friends, which the tests do not use. On a machine with an init system
# the package also enables a system Prometheus on :9090; the tests never use
# it (they run their own, on free ports).
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

failed=0
for entry in "${WANTED[@]}"; do
    IFS='|' read -r cmd pkg <<<"$entry"
    if have "$cmd"; then
        log "$cmd: $("$cmd" --version 2>&1 | head -1)"
    else
        log "$cmd still missing after installing $pkg"
        failed=1
    fi
done
exit "$failed"
