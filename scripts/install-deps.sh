#!/usr/bin/env bash
# Installs the Debian packages that building and testing libhmm need.
# Idempotent and quick when everything is present: apt-get runs only for what is missing.
# The library itself needs only libc and pthreads; the rest is toolchain and test tooling.
set -euo pipefail

packages=(
	build-essential   # gcc, make, libc headers
	cmake             # the build
	libasan8          # AddressSanitizer runtime (gcc 12)
	libubsan1         # UndefinedBehaviorSanitizer runtime
	libtsan2          # ThreadSanitizer runtime
	clang             # make check-fuzz: the harness is built with clang ...
	libclang-rt-14-dev # ... whose libFuzzer runtime (libclang_rt.fuzzer) is here
	spin              # model checker: make check-model (src/mirror.pml)
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing ${missing[*]}; run as root or install them" >&2
	exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
