#!/usr/bin/env bash
# Reset the extracted llama.cpp tree (a git repo whose first commit is the pristine vendor
# tree) to pristine and apply native/patches/*.patch in order. Files are only rewritten where
# they differ, so an unchanged patch series does not trigger a rebuild of untouched sources.
set -euo pipefail
tree=$1; shift
git -C "$tree" reset -q --hard pristine
git -C "$tree" clean -qfd
for p in "$@"; do
    echo "applying $(basename "$p")"
    if ! git -C "$tree" apply --whitespace=nowarn "$(realpath "$p")"; then
        echo "error: patch $p does not apply to $tree" >&2
        exit 1
    fi
done
