#!/usr/bin/env bash
# Installs what `python3 bench/run.py` needs: nginx (upstream and reference
# proxy) and wrk (load generator), from Debian. Idempotent: does nothing when
# both are already on PATH. Needs root (or sudo) for apt-get.
#   scripts/bench-deps.sh
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have nginx && have wrk; then
    echo "bench-deps: nginx and wrk already present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    have sudo || { echo "bench-deps: need root or sudo for apt-get" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq

pkgs=()
have wrk || pkgs+=(wrk)
if ! have nginx; then
    # nginx-light is the smallest build with the proxy and proxy_cache modules;
    # on releases where it is gone, the plain nginx package has them too.
    if [ -n "$(apt-cache policy nginx-light 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '(none)')" ]; then
        pkgs+=(nginx-light)
    else
        pkgs+=(nginx)
    fi
fi

echo "bench-deps: installing ${pkgs[*]}"
# On a machine with an init system the Debian package also enables a system
# nginx on port 80; the harness never uses it (it runs its own, on free ports).
$SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null

have nginx || { echo "bench-deps: nginx still missing after install" >&2; exit 1; }
have wrk || { echo "bench-deps: wrk still missing after install" >&2; exit 1; }
echo "bench-deps: $(nginx -v 2>&1), $(wrk -v 2>&1 | head -1)"
