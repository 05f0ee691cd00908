#!/bin/sh
# The re-encryption benchmarks of issue 10 in one repeatable procedure:
#   1. a release build of nbdcryptctl and nbdcryptd (PROFILE=thin, the default here: thin LTO,
#      16 codegen units, minutes instead of the fat-LTO release profile's quarter hour;
#      PROFILE=release for the real profile; PROFILE=none to use what target/release holds);
#   2. offline re-encryption in /dev/shm (memory) and on a disk directory (DISK_DIR, default
#      /var/tmp): dd copy, `cryptsetup reencrypt`, nbdcryptctl in each resilience mode
#      (benches/reencrypt_offline.sh);
#   3. online: fio 4k random QD32 through nbdcryptd with and without a concurrent online
#      re-encryption (benches/reencrypt_online.sh).
# Every figure comes with the CPU model and the load average: on a shared machine quote the
# per-CPU-second rates and the ratios to the references of the same run, not bare wall rates.
# Usage: benches/reencrypt.sh [DATA_MiB] [OTHER_NBDCRYPTCTL]   (default 1024 MiB; OTHER: an
#        older nbdcryptctl for before/after rows). Needs cryptsetup, fio (nbd engine), jq.
set -eu
cd "$(dirname "$0")/.."
MIB=${1:-1024}
OTHER=${2:-}
T=${CARGO_TARGET_DIR:-target}
case ${PROFILE:-thin} in
thin)
    echo "== build: release, thin LTO, 16 codegen units (env override of the fat-LTO profile)"
    CARGO_PROFILE_RELEASE_LTO=thin CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        nice cargo build -q --release --bin nbdcryptctl --bin nbdcryptd ;;
release)
    echo "== build: release profile (fat LTO)"
    nice cargo build -q --release --bin nbdcryptctl --bin nbdcryptd ;;
none) echo "== no build: using $T/release as it is" ;;
*) echo "PROFILE must be thin, release or none" >&2; exit 2 ;;
esac
echo "== offline, /dev/shm"
BENCH_DIR=/dev/shm sh benches/reencrypt_offline.sh "$MIB" "$T/release/nbdcryptctl" $OTHER
echo "== offline, disk (${DISK_DIR:-/var/tmp})"
BENCH_DIR=${DISK_DIR:-/var/tmp} sh benches/reencrypt_offline.sh "$MIB" "$T/release/nbdcryptctl" $OTHER
echo "== online, /dev/shm"
sh benches/reencrypt_online.sh "$MIB" "$T/release"
