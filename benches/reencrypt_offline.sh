#!/bin/sh
# Offline volume-key re-encryption throughput, one run each on the same image in /dev/shm:
#   dd copy of the data area (the memory-bandwidth reference), `cryptsetup reencrypt`
#   (cryptsetup's own offline re-key, checksum resilience) and `nbdcryptctl reencrypt`
#   (checksum, journal, none). A benchmark, not a test: prints a table, asserts nothing.
# Each row: wall time, wall rate, CPU time (user+sys, all threads) and the rate per CPU-second
# ("per core"), and the ratio of the wall rate to cryptsetup's and to dd's in the same run.
# Usage: benches/reencrypt_offline.sh [DATA_MiB] [NBDCRYPTCTL] [OTHER_NBDCRYPTCTL]
#        (default 1024 MiB, target/release/nbdcryptctl; build it with
#        `cargo build --release -p nbdcryptctl`; OTHER: e.g. an older build, for before/after)
set -eu
MIB=${1:-1024}
CTL=${2:-target/release/nbdcryptctl}
OTHER=${3:-}
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)
DIR=$(mktemp -d /dev/shm/nbdcrypt-reenc-bench.XXXXXX)
trap 'rm -rf "$DIR"' EXIT
printf 'bench-passphrase' > "$DIR/key"
IMG="$DIR/base.img"
truncate -s $((16 + MIB))M "$IMG"
"$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file "$DIR/key" "$IMG"
# Fill the data area with ciphertext-like bytes (the content does not change the work).
dd if=/dev/urandom of="$IMG" bs=1M seek=16 count="$MIB" conv=notrunc status=none
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), family $(lscpu | sed -n 's/^CPU family: *//p' | head -1) model $(lscpu | sed -n 's/^Model: *//p' | head -1), $(nproc) CPUs"
echo "data: $MIB MiB in /dev/shm; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-42s %8s %10s %8s %12s %8s %8s\n' run wall MB/s cpu "MB/cpu-s" "vs cs" "vs dd"
REF_CS=""; REF_DD=""
# run LABEL CMD...: time CMD (wall and user+sys CPU), print a row.
run() {
    label=$1; shift
    /usr/bin/time -f '%e %U %S' -o "$DIR/time" "$@"
    set -- $(cat "$DIR/time")
    row=$(awk -v m="$MIB" -v w="$1" -v u="$2" -v s="$3" -v cs="$REF_CS" -v dd="$REF_DD" -v l="$label" 'BEGIN {
        w = (w < 0.01 ? 0.01 : w); c = u + s; c = (c < 0.01 ? 0.01 : c); r = m * 1.048576 / w;
        printf "%-42s %7.2fs %10.1f %7.2fs %12.1f %8s %8s\n", l, w, r, c, m * 1.048576 / c,
            (cs == "" ? "-" : sprintf("%.2f", r / cs)), (dd == "" ? "-" : sprintf("%.2f", r / dd)) }')
    echo "$row"
    LAST=$(awk -v m="$MIB" -v w="$1" 'BEGIN { w = (w < 0.01 ? 0.01 : w); print m * 1.048576 / w }')
}
run "dd copy (bs=4M)" dd if="$IMG" of="$DIR/copy" bs=4M skip=4 count=$((MIB / 4)) status=none
REF_DD=$LAST
rm -f "$DIR/copy"
cp "$IMG" "$DIR/cs.img"
run "cryptsetup reencrypt (checksum)" "$CS" reencrypt -q --force-offline-reencrypt \
    --resilience checksum --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$DIR/key" "$DIR/cs.img"
REF_CS=$LAST
rm -f "$DIR/cs.img"
for bin in "$CTL" $OTHER; do
    for r in "checksum 64M" "checksum 16M" "journal 16M" "none 64M"; do
        set -- $r
        cp "$IMG" "$DIR/our.img"
        run "$(basename "$(dirname "$bin")")/nbdcryptctl ($1, zone $2)" \
            "$bin" reencrypt -q --resilience "$1" --hotzone-size "$2" --key-file "$DIR/key" "$DIR/our.img"
        rm -f "$DIR/our.img"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
