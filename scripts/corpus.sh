#!/usr/bin/env bash
# Fetches the module graph of the end-to-end corpus program
# (tests/e2e/corpus: go.mod, go.sum, main.go) ONCE, with the real go command
# and this machine's normal GOPROXY, into
#     ${SIDECAR_CORPUS_DIR:-$HOME/.cache/goproxy-sidecar/corpus}/
#         modcache/cache/download/   a static GOPROXY tree (the upstreams serve it)
#         gocache/                   a warm build cache (-trimpath builds share it)
#         stamp                      sha256 of the corpus sources it was made from
# The e2e tests never leave loopback: they serve that tree with nginx.
#
#   scripts/corpus.sh
#
# Idempotent: when the stamp matches the committed sources nothing is fetched.
# A new fetch goes to a scratch folder, is proven complete by building the
# program offline from it (GOPROXY=file://..., GOSUMDB=off, fresh GOMODCACHE,
# the committed go.sum verifying every byte), and only then replaces the old
# corpus. Without a Go toolchain it only warns (the e2e tests then skip, or
# fail when CI=true).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="$ROOT/tests/e2e/corpus"
CORPUS_DIR="${SIDECAR_CORPUS_DIR:-$HOME/.cache/goproxy-sidecar/corpus}"
FILES=(go.mod go.sum main.go)

log() { echo "corpus.sh: $*" >&2; }

stamp() {
    (cd "$SRC" && sha256sum "${FILES[@]}") | sha256sum | cut -d' ' -f1
}

# offline_build TREE GOCACHE: build the program from TREE alone, as the tests do.
offline_build() {
    local tree="$1" gocache="$2" work
    work="$(mktemp -d)"
    cp "${FILES[@]/#/$SRC/}" "$work/"
    (
        cd "$work"
        env -u GOPRIVATE -u GONOPROXY -u GONOSUMDB -u GOINSECURE \
            GOENV=off GOTOOLCHAIN=local GOFLAGS=-mod=mod GOSUMDB=off \
            GOPROXY="file://$tree" GOMODCACHE="$work/modcache" GOCACHE="$gocache" \
            go build -trimpath -o "$work/corpus" .
    )
    local rc=$?
    chmod -R u+w "$work" 2>/dev/null || true
    rm -rf "$work"
    return $rc
}

main() {
    if ! command -v go >/dev/null 2>&1; then
        log "no Go toolchain on PATH: no corpus; the e2e tests skip (fail under CI=true)"
        return 0
    fi
    local want
    want="$(stamp)"
    if [[ -f "$CORPUS_DIR/stamp" ]] && [[ "$(cat "$CORPUS_DIR/stamp")" == "$want" ]] \
        && [[ -d "$CORPUS_DIR/modcache/cache/download" ]]; then
        log "present in $CORPUS_DIR"
        return 0
    fi
    mkdir -p "$(dirname "$CORPUS_DIR")"
    local scratch
    scratch="$(mktemp -d "$CORPUS_DIR.new.XXXXXX")"
    trap 'chmod -R u+w "$scratch" 2>/dev/null || true; rm -rf "$scratch"' EXIT
    log "go mod download all (GOPROXY=$(go env GOPROXY)) into $scratch"
    # A copy of the sources: `go mod download` may touch go.sum, and the
    # committed one must already be complete (compared below).
    mkdir "$scratch/src"
    cp "${FILES[@]/#/$SRC/}" "$scratch/src/"
    (cd "$scratch/src" && GOTOOLCHAIN=local GOFLAGS=-modcacherw \
        GOMODCACHE="$scratch/modcache" go mod download all)
    if ! cmp -s "$scratch/src/go.sum" "$SRC/go.sum"; then
        log "tests/e2e/corpus/go.sum is incomplete (go mod download changed it):"
        diff "$SRC/go.sum" "$scratch/src/go.sum" >&2 || true
        return 1
    fi
    rm -rf "$scratch/src"
    # Only cache/download is served; the extracted sources are not needed.
    find "$scratch/modcache" -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} +
    log "offline build from the tree (also warms the build cache)"
    offline_build "$scratch/modcache/cache/download" "$scratch/gocache"
    echo "$want" >"$scratch/stamp"
    if [[ -e "$CORPUS_DIR" ]]; then
        chmod -R u+w "$CORPUS_DIR" 2>/dev/null || true
        rm -rf "$CORPUS_DIR"
    fi
    mv "$scratch" "$CORPUS_DIR"
    trap - EXIT
    log "ready: $CORPUS_DIR ($(du -sh "$CORPUS_DIR/modcache/cache/download" | cut -f1) of modules)"
}

main "$@"
