#!/bin/sh
# End-to-end cost of metrics: fio 4k random read, QD32, through nbdcryptd on one volume in
# /dev/shm, variants interleaved round by round, median IOPS of each:
#   plain     nbdcryptd without --metrics (the reference; the hooks still count, for `top`)
#   metrics   nbdcryptd --metrics 127.0.0.1:PORT, scraped every second by curl during the run
#   OTHER     (optional) another nbdcryptd binary, with --metrics and the scraper: e.g. a
#             build of the previous, unsharded counters
# A benchmark, not a test: prints, asserts nothing.
# Usage: benches/metrics_ab.sh [ROUNDS] [SECONDS] [BINDIR] [OTHER_NBDCRYPTD]
#        (default 3 rounds of 10 s, target/release; build with
#        `cargo build --release --bin nbdcryptd --bin nbdcryptctl`; CTL=path/to/nbdcryptctl
#        to take the control tool from elsewhere, it only polls the status)
set -eu
ROUNDS=${1:-3}
SECS=${2:-10}
BIN=${3:-target/release}
OTHER=${4:-}
CTL=${CTL:-$BIN/nbdcryptctl}
MIB=512
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)
DIR=$(mktemp -d /dev/shm/nbdcrypt-metrics-ab.XXXXXX)
PID=
SCRAPER=
cleanup() {
    [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null
    [ -n "$PID" ] && kill "$PID" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$DIR"
}
trap cleanup EXIT
printf 'bench-passphrase' > "$DIR/key"
IMG="$DIR/vol.img"
truncate -s $((16 + MIB))M "$IMG"
"$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file "$DIR/key" "$IMG"
dd if=/dev/urandom of="$IMG" bs=1M seek=16 count="$MIB" conv=notrunc status=none
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

# run VARIANT DAEMON [--metrics]: start the daemon, fio for SECS, stop; prints IOPS.
run() {
    variant=$1; daemon=$2; shift 2
    rm -f "$DIR/nbd.sock" "$DIR/ctl.sock"
    "$daemon" --volume "$IMG" --unix "$DIR/nbd.sock" --control "$DIR/ctl.sock" \
        --unlock-key-file "$DIR/key" "$@" 2> "$DIR/daemon-$variant.log" &
    PID=$!
    i=0
    until "$CTL" status --control "$DIR/ctl.sock" 2>/dev/null | grep -q unlocked; do
        i=$((i + 1)); [ $i -lt 300 ] || { cat "$DIR/daemon-$variant.log" >&2; exit 1; }; sleep 0.1
    done
    if [ "$#" -gt 0 ]; then
        (while :; do curl -s "http://127.0.0.1:$PORT/metrics" > /dev/null; sleep 1; done) &
        SCRAPER=$!
    fi
    fio --ioengine=nbd --uri="nbd+unix:///nbdcrypt?socket=$DIR/nbd.sock" --name=qd32 \
        --rw=randread --bs=4k --iodepth=32 --size="${MIB}M" --time_based --runtime="$SECS" \
        --output-format=json --output="$DIR/fio.json" > /dev/null
    if [ -n "$SCRAPER" ]; then kill "$SCRAPER"; wait "$SCRAPER" 2>/dev/null || true; SCRAPER=; fi
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
    jq '.jobs[0].read.iops' "$DIR/fio.json"
}

lscpu | sed -n 's/^Model name: *//p' | head -1
lscpu | sed -n 's/^CPU family: *//p; s/^Model: *//p' | tr '\n' ' '; echo "(family, model)"
echo "fio 4k randread QD32, $SECS s per run, $ROUNDS interleaved rounds, $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
: > "$DIR/results"
r=0
while [ $r -lt "$ROUNDS" ]; do
    r=$((r + 1))
    echo "plain $(run plain "$BIN/nbdcryptd")" >> "$DIR/results"
    echo "metrics $(run metrics "$BIN/nbdcryptd" --metrics "127.0.0.1:$PORT")" >> "$DIR/results"
    if [ -n "$OTHER" ]; then
        echo "other $(run other "$OTHER" --metrics "127.0.0.1:$PORT")" >> "$DIR/results"
    fi
    tail -n "$([ -n "$OTHER" ] && echo 3 || echo 2)" "$DIR/results" | tr '\n' ' '; echo "(round $r)"
done
median() { grep "^$1 " "$DIR/results" | cut -d' ' -f2 | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
P=$(median plain)
M=$(median metrics)
printf 'median IOPS: without --metrics %.0f, with --metrics (scraped 1/s) %.0f: ratio %.3f\n' \
    "$P" "$M" "$(echo "$M $P" | awk '{print $1/$2}')"
if [ -n "$OTHER" ]; then
    O=$(median other)
    printf 'median IOPS: %s with --metrics %.0f: ratio to the reference %.3f\n' \
        "$OTHER" "$O" "$(echo "$O $P" | awk '{print $1/$2}')"
fi
