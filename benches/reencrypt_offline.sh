#!/bin/sh
# Offline volume-key re-encryption throughput, one run each on the same image:
#   dd copy of the data area (the copy reference), `cryptsetup reencrypt` (cryptsetup's own
#   offline re-key, checksum resilience) and `nbdcryptctl reencrypt` (checksum, journal, none;
#   on a disk also with --buffered, i.e. through the page cache instead of O_DIRECT).
# A benchmark, not a test: prints a table, asserts nothing.
# Each row: wall time, wall rate, CPU time (user+sys, all threads) and the rate per CPU-second
# ("per core"), and the ratio of the wall rate and of the per-CPU-second rate to cryptsetup's
# and to dd's in the same run (wall/cpu).
# Usage: benches/reencrypt_offline.sh [DATA_MiB] [NBDCRYPTCTL] [OTHER_NBDCRYPTCTL]
#        (default 1024 MiB, target/release/nbdcryptctl; OTHER: e.g. an older build, for
#        before/after). BENCH_DIR=/dev/shm (default: memory, no disk in the way) or a directory
#        on a disk (e.g. BENCH_DIR=/var/tmp): there every run starts with the image out of the
#        page cache (written back and dropped with fadvise), dd and cryptsetup sync their
#        writes (conv=fdatasync; cryptsetup syncs each hot zone) as nbdcryptctl does.
#        benches/reencrypt.sh runs this in both places plus the online bench.
set -eu
MIB=${1:-1024}
CTL=${2:-target/release/nbdcryptctl}
OTHER=${3:-}
BASE=${BENCH_DIR:-/dev/shm}
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)
DIR=$(mktemp -d "$BASE/nbdcrypt-reenc-bench.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
FSTYPE=$(stat -f -c %T "$DIR")
printf 'bench-passphrase' > "$DIR/key"
IMG="$DIR/base.img"
truncate -s $((16 + MIB))M "$IMG"
"$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file "$DIR/key" "$IMG"
# Fill the data area with ciphertext-like bytes (the content does not change the work).
dd if=/dev/urandom of="$IMG" bs=1M seek=16 count="$MIB" conv=notrunc status=none
# uncache FILE: on a disk, write FILE back and drop it from the page cache (a cold start for
# every run); tmpfs has nothing else to keep it in, so there it is a no-op.
uncache() {
    [ "$FSTYPE" = tmpfs ] && return 0
    sync "$1"
    dd if="$1" iflag=nocache count=0 status=none
}
# fresh NAME: a copy of the image, cold.
fresh() { cp "$IMG" "$DIR/$1"; uncache "$DIR/$1"; }
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), family $(lscpu | sed -n 's/^CPU family: *//p' | head -1) model $(lscpu | sed -n 's/^Model: *//p' | head -1), $(nproc) CPUs"
echo "data: $MIB MiB in $DIR ($FSTYPE); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %8s %9s %8s %9s %11s %11s\n' run wall MB/s cpu "MB/cpu-s" "vs cs" "vs dd"
REF_CS=""; REF_DD=""; REF_CS_C=""; REF_DD_C=""
# run LABEL CMD...: time CMD (wall and user+sys CPU), print a row; LAST / LAST_C: its rates.
run() {
    label=$1; shift
    /usr/bin/time -f '%e %U %S' -o "$DIR/time" "$@"
    set -- $(tail -1 "$DIR/time")
    awk -v m="$MIB" -v w="$1" -v u="$2" -v s="$3" -v cs="$REF_CS" -v dd="$REF_DD" \
        -v csc="$REF_CS_C" -v ddc="$REF_DD_C" -v l="$label" 'BEGIN {
        w = (w < 0.01 ? 0.01 : w); c = u + s; c = (c < 0.01 ? 0.01 : c);
        r = m * 1.048576 / w; rc = m * 1.048576 / c;
        printf "%-44s %7.2fs %9.1f %7.2fs %9.1f %11s %11s\n", l, w, r, c, rc,
            (cs == "" ? "-" : sprintf("%.2f/%.2f", r / cs, rc / csc)),
            (dd == "" ? "-" : sprintf("%.2f/%.2f", r / dd, rc / ddc)) }'
    LAST=$(awk -v m="$MIB" -v w="$1" 'BEGIN { w = (w < 0.01 ? 0.01 : w); print m * 1.048576 / w }')
    LAST_C=$(awk -v m="$MIB" -v u="$2" -v s="$3" 'BEGIN { c = u + s; c = (c < 0.01 ? 0.01 : c); print m * 1.048576 / c }')
}
uncache "$IMG"
run "dd copy (bs=4M, fdatasync)" dd if="$IMG" of="$DIR/copy" bs=4M skip=4 count=$((MIB / 4)) \
    conv=fdatasync status=none
REF_DD=$LAST; REF_DD_C=$LAST_C
rm -f "$DIR/copy"
fresh cs.img
run "cryptsetup reencrypt (checksum)" "$CS" reencrypt -q --force-offline-reencrypt \
    --resilience checksum --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$DIR/key" "$DIR/cs.img"
REF_CS=$LAST; REF_CS_C=$LAST_C
rm -f "$DIR/cs.img"
MODES="checksum:64M checksum:16M journal:16M none:64M"
[ "$FSTYPE" = tmpfs ] || MODES="$MODES checksum:64M:--buffered none:64M:--buffered"
for bin in "$CTL" $OTHER; do
    for r in $MODES; do
        mode=${r%%:*}; rest=${r#*:}; zone=${rest%%:*}; extra=${rest#"$zone"}; extra=${extra#:}
        # An older build may not know --buffered: skip those rows for it.
        if [ -n "$extra" ] && ! "$bin" reencrypt --help | grep -q -- "$extra"; then continue; fi
        fresh our.img
        run "$(basename "$(dirname "$bin")")/nbdcryptctl ($mode, zone $zone${extra:+, $extra})" \
            "$bin" reencrypt -q --resilience "$mode" --hotzone-size "$zone" $extra \
            --key-file "$DIR/key" "$DIR/our.img"
        rm -f "$DIR/our.img"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
