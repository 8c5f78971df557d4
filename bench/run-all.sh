#!/usr/bin/env bash
# Runs every benchmark executable in the given build directory; each prints its
# own `BENCH <id> <value> <unit>` lines. Exits non-zero if any benchmark fails.
set -u
dir=${1:?usage: run-all.sh BUILD_BENCH_DIR}
status=0
for b in "$dir"/bench_*; do
	[ -x "$b" ] || continue
	echo "# $(basename "$b")"
	"$b" || { echo "# $(basename "$b") failed (exit $?)"; status=1; }
done
exit $status
