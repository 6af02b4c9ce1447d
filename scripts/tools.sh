#!/usr/bin/env bash
# Builds the pinned Go tools the tests need, from source, with
# `go install module@version`, into ONE folder:
#     ${SIDECAR_TOOLS_DIR:-$HOME/.cache/goproxy-sidecar/bin}
# tests/tools.py looks there first, then on PATH.
#
#   scripts/tools.sh            every tool below
#   scripts/tools.sh opa        only the named ones
#
# Idempotent: a tool whose binary already reports the pinned version (per the
# build info `go version -m` reads from it) is not rebuilt. Without a Go
# toolchain it only warns (the tests that need a tool then skip, or fail when
# CI=true); a failed build exits non-zero.
set -euo pipefail

TOOLS_DIR="${SIDECAR_TOOLS_DIR:-$HOME/.cache/goproxy-sidecar/bin}"

# The pins: binary name | package to `go install` | version (of its module).
# One line per tool; add a tool by adding a line (same function builds it).
PINS=(
    # Policy engine: `opa check/fmt/test`, and `opa run --server` for the OPA engine tests.
    "opa|github.com/open-policy-agent/opa|v1.22.2"
    # Fault injection (latency, resets) between the sidecar and an upstream.
    # The Go module proxy here serves v2.3.0 and v2.5.0 only; up to v2.5.0 the
    # server is cmd/server (cmd/toxiproxy-server in later releases).
    "toxiproxy-server|github.com/Shopify/toxiproxy/v2/cmd/server|v2.5.0"
    # kustomize builds of deploy/kubernetes (Debian has none recent enough).
    "kustomize|sigs.k8s.io/kustomize/kustomize/v5|v5.5.0"
    # Athens, the real upstream of the end-to-end tests (its binary is `proxy`;
    # installed here as `athens`). Slot kept for the issue that adds it: the
    # Go module proxy reachable from here answers 403 for github.com/gomods/athens.
    # "athens|github.com/gomods/athens/cmd/proxy|v0.15.4"
)

log() { echo "tools.sh: $*" >&2; }

# pinned_version BINARY MODULE_PREFIX -> prints the version the binary was built from
pinned_version() {
    go version -m "$1" 2>/dev/null | awk -v pkg="$2" '
        $1 == "path" && $2 == pkg { path = $2 }
        $1 == "mod" && index(path, $2) == 1 { print $3; exit }'
}

# install NAME PACKAGE VERSION
install() {
    local name="$1" pkg="$2" version="$3"
    local bin="$TOOLS_DIR/$name"
    if [[ -x "$bin" ]] && [[ "$(pinned_version "$bin" "$pkg")" == "$version" ]]; then
        log "$name $version: present"
        return 0
    fi
    log "$name $version: go install $pkg@$version"
    # Build into a scratch GOBIN so a failed or partial build never replaces a
    # working binary, then move it into place under its tool name.
    local scratch
    scratch="$(mktemp -d)"
    if ! GOBIN="$scratch" GOFLAGS="${GOFLAGS:--buildvcs=false}" go install "$pkg@$version"; then
        rm -rf "$scratch"
        log "$name: go install $pkg@$version FAILED"
        return 1
    fi
    # The binary is named after the last element that is not a /vN suffix.
    local built
    built="$(basename "$pkg")"
    [[ "$built" =~ ^v[0-9]+$ ]] && built="$(basename "$(dirname "$pkg")")"
    mv -f "$scratch/$built" "$bin"
    rm -rf "$scratch"
    log "$name $version: installed in $bin"
}

main() {
    if ! command -v go >/dev/null 2>&1; then
        log "no Go toolchain on PATH: not building ${*:-the tools}; tests that need them skip"
        log "(install Go, or put the binaries in $TOOLS_DIR)"
        return 0
    fi
    mkdir -p "$TOOLS_DIR"
    local failed=0 pin name pkg version wanted known
    for wanted in "$@"; do
        known=0
        for pin in "${PINS[@]}"; do
            [[ "${pin%%|*}" == "$wanted" ]] && known=1
        done
        if [[ $known == 0 ]]; then
            log "unknown tool: $wanted"
            failed=1
        fi
    done
    for pin in "${PINS[@]}"; do
        IFS='|' read -r name pkg version <<<"$pin"
        if [[ $# -gt 0 ]] && [[ ! " $* " == *" $name "* ]]; then
            continue
        fi
        install "$name" "$pkg" "$version" || failed=1
    done
    return "$failed"
}

main "$@"
