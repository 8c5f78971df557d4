#!/usr/bin/env bash
# Checks src/mirror.pml with spin (docs/model.md): the model of the code must
# pass, and each broken variant must produce a counterexample, so that a model
# that can no longer fail does not pass quietly either.
# Usage: scripts/check-model.sh [build dir]   (default build-model)
set -euo pipefail
cd "$(dirname "$0")/.."
model=$PWD/src/mirror.pml
dir=${1:-build-model}
mkdir -p "$dir"
cd "$dir"

# Safety properties only (assertions, invalid end states); COLLAPSE keeps
# memory under ~300 MiB for the largest variant.
PAN_CFLAGS="-O2 -DSAFETY -DCOLLAPSE"
PAN_FLAGS="-m10000"
failed=0

# verify NAME EXPECT DEFINES...: EXPECT is pass or fail.
verify() {
	local name=$1 expect=$2 errors
	shift 2
	rm -rf "$name"
	mkdir "$name"
	(
		cd "$name"
		spin "$@" -a "$model" >spin.log
		gcc $PAN_CFLAGS -o pan pan.c
		./pan $PAN_FLAGS >pan.log 2>&1 || true
	)
	errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' "$name/pan.log")
	printf '%-22s must %-4s  errors %s, %s states, depth %s, %s s, %s MB\n' \
		"$name" "$expect" "${errors:-?}" \
		"$(awk '/states, stored/ {print $1}' "$name/pan.log")" \
		"$(sed -n 's/.*depth reached \([0-9]*\).*/\1/p' "$name/pan.log")" \
		"$(awk '/pan: elapsed time/ {print $4}' "$name/pan.log")" \
		"$(awk '/total actual memory usage/ {print $1}' "$name/pan.log")"
	[ "$expect" = fail ] && sed -n 's/^pan:1: /    found: /p' "$name/pan.log"
	if grep -q 'max search depth too small' "$name/pan.log"; then
		echo "check-model: $name: the search was cut at depth ${PAN_FLAGS#-m}: raise it" >&2
		failed=1
	elif [ "$expect" = pass ] && [ "${errors:-x}" != 0 ]; then
		echo "check-model: $name: spin found a violation (replay: cd $dir/$name && spin -t -p $* $model)" >&2
		failed=1
	elif [ "$expect" = fail ] && { [ -z "$errors" ] || [ "$errors" = 0 ]; }; then
		echo "check-model: $name: spin found no violation in a variant that must have one" >&2
		failed=1
	fi
}

verify model                pass
verify protect              pass -DPROTECT
verify broken-unlocked-skip fail -DBROKEN_UNLOCKED_SKIP
verify broken-no-backoff    fail -DBROKEN_NO_BACKOFF
# The stale-protection bug the model found, fixed in 823b31a (docs/model.md).
verify broken-stale-prot    fail -DPROTECT -DBROKEN_STALE_PROT
exit $failed
