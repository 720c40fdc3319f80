#!/usr/bin/env bash
# Headless Chromium for the report tests (tests/test_observe.py), from Debian's chromium package.
#   tests/chromium.sh   print the browser's path; install it first if missing (root + apt-get)
# Exit code 3 means "cannot be installed here" (not root, no apt-get, ...), with the reason on stdout.
# apt-get runs under the same lock as tests/slurm_cluster.sh's, so the two never collide.
set -uo pipefail

cannot() { echo "cannot get a headless Chromium: $*"; exit 3; }

find_browser() {
    for b in chromium chromium-browser chromium-headless-shell google-chrome; do
        command -v "$b" 2>/dev/null && return 0
    done
    return 1
}

find_browser && exit 0
[ "$(id -u)" = 0 ] || cannot "chromium is not installed and this is not root"
command -v apt-get >/dev/null || cannot "chromium is not installed and there is no apt-get"
echo "installing chromium with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
(
    flock 9
    find_browser >/dev/null && exit 0
    apt-get update -qq >&2 || exit 1
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
) 9>/tmp/bigtrain-apt.lock || cannot "apt-get install chromium failed"
find_browser || cannot "chromium installed but not found on PATH"
