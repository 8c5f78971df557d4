#!/usr/bin/env bash
# Prepares the machine for the tests, best effort: what cannot be done only
# makes the tests that need it skip, with their reason printed.
#   - hugetlbfs: the in-place tests (tests/test_inplace.c) and hmm-tests'
#     anon_write_hugetlbfs need a few 2 MiB huge pages; a fresh machine
#     reserves none. As root, reserve 16 (32 MiB) unless there are already.
set -uo pipefail

want=16
have=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
if [ "$have" -lt "$want" ] && [ "$(id -u)" -eq 0 ]; then
	echo "$want" > /proc/sys/vm/nr_hugepages 2>/dev/null ||
		echo "test-env: could not reserve huge pages; hugetlbfs tests will skip" >&2
fi
exit 0
