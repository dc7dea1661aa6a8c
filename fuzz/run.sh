#!/bin/sh
# Fuzz one target with AFL++ (from cargo-afl) for SECONDS (default 300).
#   fuzz/run.sh TARGET [SECONDS]
# Build first: (cd fuzz && nice -n 19 cargo afl build --release)
# Findings land in fuzz/out/TARGET/default/{crashes,hangs}; see docs/fuzzing.md.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
t=${1:?usage: fuzz/run.sh TARGET [SECONDS]}
secs=${2:-300}
AFL_FUZZ=${AFL_FUZZ:-$(ls -d "$HOME"/.local/share/afl.rs/rustc-*/afl.rs-*/afl/bin 2>/dev/null | tail -n 1)/afl-fuzz}
# The two ends start threads and write files: a generous time limit; memory
# is capped so that a runaway allocation is a crash, not an OOM kill.
timeout_ms=1000
case $t in target_end|source_end) timeout_ms=5000 ;; esac
mkdir -p "$here/out"
export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
# A second run of the same target resumes where the first stopped.
input=${INPUT:-"$here/corpus/$t"}
[ -d "$here/out/$t/default/queue" ] && input=-
exec nice -n 19 "$AFL_FUZZ" -i "$input" -o "$here/out/$t" -V "$secs" -t "$timeout_ms" -m 4096 \
    "$here/target/release/$t"
