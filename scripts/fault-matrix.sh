#!/bin/sh
# The copy fault matrix (tests/faults.rs): a live copy through every phase
# with one fault per cell. Prints the phase x fault table, then each cell's
# outcome in full, as in docs/faults.md. No root needed.
set -e
cd "$(dirname "$0")/.."
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
XMF_MATRIX_DIR=$dir cargo test -q --test faults >&2
# Phase order: the files are named after the phase's index.
for f in $(ls "$dir" | sort -n); do cat "$dir/$f"; done | sed 's#/tmp/\.tmp[A-Za-z0-9]*#TMP#g; s/|/\\|/g' > "$dir/all.tsv"
awk -F'\t' '
BEGIN {
    n = split("SIGKILL to the source|SIGTERM to the source|SIGKILL to the target|SIGTERM to the target|link cut|link stalls|corrupted frame|duplicated frame|reference changed|EIO on DST|short writes on DST|DST full (ENOSPC)|write lands changed", col, "|")
}
{
    if (!($1 in seen)) { seen[$1] = 1; rows[++r] = $1 }
    if ($3 != "ok") c = "**VIOLATION**"
    else if ($4 ~ /^verified/) c = "verified"
    else if ($4 ~ /^no DST I\/O.*verified/) c = "verified (no I/O left)"
    else if ($4 ~ /^failed/) c = "failed, exit 1"
    else c = $4
    cell[$1, $2] = c
    detail[++d] = "| " $1 " | " $2 " | " ($3 == "ok" ? "" : $3 "; ") $4 " |"
}
END {
    printf "| phase / fault |"; for (i = 1; i <= n; i++) printf " %s |", col[i]; printf "\n|---|"
    for (i = 1; i <= n; i++) printf "---|"; printf "\n"
    for (j = 1; j <= r; j++) {
        printf "| %s |", rows[j]
        for (i = 1; i <= n; i++) printf " %s |", ((rows[j], col[i]) in cell ? cell[rows[j], col[i]] : "not run")
        printf "\n"
    }
    printf "\nEvery cell in full (\"rerun\": a plain copy onto the same DST afterwards):\n\n| phase | fault | outcome |\n|---|---|---|\n"
    for (k = 1; k <= d; k++) print detail[k]
}' "$dir/all.tsv"
