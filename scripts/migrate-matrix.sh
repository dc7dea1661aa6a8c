#!/bin/sh
# The migrate host tests (tests/migrate_host.rs: fake Xen, fake LVM, real
# xenmig) and their case x outcome matrix, as in docs/faults.md. Needs root.
set -e
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
XMT_MATRIX_DIR=$dir cargo test -q --test migrate_host >&2
printf '| case | outcome |\n|---|---|\n'
cat "$dir"/* | sort | sed 's/xmt\([st]\)-[0-9]*-[0-9]*/xmt\1-ID/g; s/pid [0-9]*/pid N/g; s/|/\\|/g; s/^/| /; s/\t/ | /; s/$/ |/'
