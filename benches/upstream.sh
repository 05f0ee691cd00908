#!/bin/sh
# The cost of one more hop: fio against nbdcryptd's encrypted export over an nbdkit-memory
# upstream (nbdcryptd --volume nbd+unix://...) versus the same nbdkit served directly, same run:
#   1 MiB sequential write, 1 MiB sequential read, 4k random read QD32.
# Two more columns split the cost: `nbdcryptd --plain` over the same upstream (the hop alone, no
# encryption) and nbdcryptd on a local LUKS2 file in /dev/shm (encryption, no upstream hop).
# Prints MB/s or IOPS of each and the ratios against nbdkit served directly.
# A benchmark, not a test.
# Usage: [RUNTIME=s] [NO_LOCAL=1] [DAEMON=path] benches/upstream.sh [DATA_MiB] [BINDIR]
#        (default 15 s per run, 1024 MiB, target/release for nbdcryptd; nbdcryptctl may be a debug
#        build. Build with `cargo build --release -p nbdcrypt --bin nbdcryptd`.) NO_LOCAL=1 skips the
#        crypt-on-shm column; DAEMON=path runs that nbdcryptd binary instead of BINDIR's (for A/B
#        runs of two builds: alternate them, same run, and compare each one's ratios).
set -eu
MIB=${1:-1024}
BIN=${2:-target/release}
CTL=${CTL:-$BIN/nbdcryptctl}
DAEMON=${DAEMON:-$BIN/nbdcryptd}
[ -x "$CTL" ] || CTL=target/debug/nbdcryptctl
DIR=$(mktemp -d /dev/shm/nbdcrypt-upstream-bench.XXXXXX)
NBDKIT=
PID=
LPID=
PPID_=
cleanup() {
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    [ -n "$PPID_" ] && kill "$PPID_" 2>/dev/null
    [ -n "$LPID" ] && kill "$LPID" 2>/dev/null
    [ -n "$NBDKIT" ] && kill "$NBDKIT" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
printf 'bench-passphrase' > "$DIR/key"
nbdkit -f -U "$DIR/up.sock" memory "$((16 + MIB))M" &
NBDKIT=$!
i=0
until [ -S "$DIR/up.sock" ]; do i=$((i + 1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
UP="nbd+unix:///?socket=$DIR/up.sock"
"$CTL" format "$UP" --yes --key-file "$DIR/key" --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    > /dev/null
"$DAEMON" --volume "$UP" --unix "$DIR/nbd.sock" --control "$DIR/ctl.sock" \
    --unlock-key-file "$DIR/key" 2> "$DIR/daemon.log" &
PID=$!
i=0
until "$CTL" status --control "$DIR/ctl.sock" 2>/dev/null | grep -q unlocked; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/daemon.log"; exit 1; }; sleep 0.1
done
OURS="nbd+unix:///nbdcrypt?socket=$DIR/nbd.sock"
if [ -z "${NO_LOCAL:-}" ]; then
truncate -s "$((16 + MIB))M" "$DIR/local.img"
"$CTL" format "$DIR/local.img" --yes --key-file "$DIR/key" --pbkdf pbkdf2 \
    --pbkdf-force-iterations 1000 > /dev/null
"$DAEMON" --volume "$DIR/local.img" --unix "$DIR/local.sock" --control "$DIR/lctl.sock" \
    --unlock-key-file "$DIR/key" 2> "$DIR/local.log" &
LPID=$!
i=0
until "$CTL" status --control "$DIR/lctl.sock" 2>/dev/null | grep -q unlocked; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/local.log"; exit 1; }; sleep 0.1
done
LOCAL="nbd+unix:///nbdcrypt?socket=$DIR/local.sock"
fi
# The hop alone: the same upstream served unencrypted through nbdcryptd (fio stays past the
# header, like the direct reference).
"$DAEMON" --plain "$UP" --unix "$DIR/plain.sock" 2> "$DIR/plain.log" &
PPID_=$!
i=0
until [ -S "$DIR/plain.sock" ]; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/plain.log"; exit 1; }; sleep 0.1
done
PLAIN="nbd+unix:///nbdcrypt?socket=$DIR/plain.sock"
# The direct reference covers the same bytes: the upstream's data area (after the 16 MiB header).
fio_run() { # URI NAME RW BS QD OFFSET -> MB/s or IOPS
    fio --ioengine=nbd --uri="$1" --name="$2" --rw="$3" --bs="$4" --iodepth="$5" \
        --offset="$6" --size="${MIB}M" --time_based --runtime="${RUNTIME:-15}" --output-format=json \
        --output="$DIR/fio.json" > /dev/null
    case "$3" in
    write) jq '.jobs[0].write.bw_bytes / 1e6' "$DIR/fio.json" ;;
    read) jq '.jobs[0].read.bw_bytes / 1e6' "$DIR/fio.json" ;;
    randread) jq '.jobs[0].read.iops' "$DIR/fio.json" ;;
    *) jq '.jobs[0].write.iops' "$DIR/fio.json" ;;
    esac
}
lscpu | sed -n 's/^Model name: *//p' | head -1
echo "nbdcryptd: $DAEMON"
echo "data: $MIB MiB, nbdkit memory upstream on a Unix socket, $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-18s %14s %14s %7s %14s %7s %14s\n' test direct-nbdkit plain-over-it ratio crypt-over-it ratio crypt-on-shm
for t in "seq-write write 1M 4" "seq-read read 1M 4" "4k-randread-QD32 randread 4k 32" \
    "4k-randwrite-QD32 randwrite 4k 32"; do
    set -- $t
    d=$(fio_run "$UP" "$1" "$2" "$3" "$4" 16M)
    p=$(fio_run "$PLAIN" "$1" "$2" "$3" "$4" 16M)
    o=$(fio_run "$OURS" "$1" "$2" "$3" "$4" 0)
    l=0
    [ -n "${NO_LOCAL:-}" ] || l=$(fio_run "$LOCAL" "$1" "$2" "$3" "$4" 0)
    unit=MB/s; case "$2" in rand*) unit=IOPS ;; esac
    awk -v n="$1" -v d="$d" -v p="$p" -v o="$o" -v l="$l" -v u="$unit" \
        'BEGIN { printf "%-18s %9.1f %-4s %9.1f %-4s %6.1f%% %9.1f %-4s %6.1f%% %9.1f %-4s\n", n, d, u, p, u, 100*p/d, o, u, 100*o/d, l, u }'
done
