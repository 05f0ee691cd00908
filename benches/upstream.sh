#!/bin/sh
# The cost of one more hop: fio against nbdcryptd's encrypted export over an nbdkit-memory
# upstream (nbdcryptd --volume nbd+unix://...) versus the same nbdkit served directly, same run:
#   1 MiB sequential write, 1 MiB sequential read, 4k random read and write at QD32.
# Two more columns split the cost: `nbdcryptd --plain` over the same upstream (the hop alone, no
# encryption) and nbdcryptd on a local LUKS2 file in /dev/shm (encryption, no upstream hop).
# Prints MB/s or IOPS of each and the ratios against nbdkit served directly.
# A benchmark, not a test.
#
# On a shared, loaded machine one run of each is noise: ROUNDS=n measures every target n times,
# interleaved (direct, plain, crypt, ... back to back, so load changes hit all of them alike),
# and prints the medians. DAEMON_B=path adds a second nbdcryptd build (its own plain and crypt
# exports over the same upstream, measured in the same rounds) for an A/B of two builds.
#
# Usage: [RUNTIME=s] [ROUNDS=n] [NO_LOCAL=1] [DAEMON=path] [DAEMON_B=path]
#        benches/upstream.sh [DATA_MiB] [BINDIR]
#        (defaults: 15 s per run, 1 round, 1024 MiB, BINDIR target/release for nbdcryptd;
#        nbdcryptctl may be a debug build. Build with
#        `cargo build --release -p nbdcrypt --bin nbdcryptd`.) NO_LOCAL=1 skips the crypt-on-shm
#        column; DAEMON=path runs that nbdcryptd instead of BINDIR's.
set -eu
MIB=${1:-1024}
BIN=${2:-target/release}
CTL=${CTL:-$BIN/nbdcryptctl}
[ -x "$CTL" ] || CTL=target/debug/nbdcryptctl
DAEMON=${DAEMON:-$BIN/nbdcryptd}
DAEMON_B=${DAEMON_B:-}
ROUNDS=${ROUNDS:-1}
DIR=$(mktemp -d /dev/shm/nbdcrypt-upstream-bench.XXXXXX)
NBDKIT=
PIDS=
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
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

crypt() { # BINARY VOLUME NAME: an unlocked encrypted export, its URI on stdout
    "$1" --volume "$2" --unix "$DIR/$3.sock" --control "$DIR/$3.ctl" \
        --unlock-key-file "$DIR/key" > "$DIR/$3.out" 2> "$DIR/$3.log" &
    echo "$!" > "$DIR/$3.pid"
    i=0
    until "$CTL" status --control "$DIR/$3.ctl" 2>/dev/null | grep -q unlocked; do
        i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/$3.log" >&2; exit 1; }; sleep 0.1
    done
    echo "nbd+unix:///nbdcrypt?socket=$DIR/$3.sock"
}
plain() { # BINARY NAME: the upstream served unencrypted (the hop alone), its URI on stdout
    "$1" --plain "$UP" --unix "$DIR/$2.sock" > "$DIR/$2.out" 2> "$DIR/$2.log" &
    echo "$!" > "$DIR/$2.pid"
    i=0
    until [ -S "$DIR/$2.sock" ]; do
        i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/$2.log" >&2; exit 1; }; sleep 0.1
    done
    echo "nbd+unix:///nbdcrypt?socket=$DIR/$2.sock"
}
OURS=$(crypt "$DAEMON" "$UP" crypt); PIDS="$PIDS $(cat "$DIR/crypt.pid")"
PLAIN=$(plain "$DAEMON" plain); PIDS="$PIDS $(cat "$DIR/plain.pid")"
if [ -n "$DAEMON_B" ]; then
    OURS_B=$(crypt "$DAEMON_B" "$UP" cryptb); PIDS="$PIDS $(cat "$DIR/cryptb.pid")"
    PLAIN_B=$(plain "$DAEMON_B" plainb); PIDS="$PIDS $(cat "$DIR/plainb.pid")"
fi
if [ -z "${NO_LOCAL:-}" ]; then
    truncate -s "$((16 + MIB))M" "$DIR/local.img"
    "$CTL" format "$DIR/local.img" --yes --key-file "$DIR/key" --pbkdf pbkdf2 \
        --pbkdf-force-iterations 1000 > /dev/null
    LOCAL=$(crypt "$DAEMON" "$DIR/local.img" local); PIDS="$PIDS $(cat "$DIR/local.pid")"
fi

# The direct reference covers the same bytes: the upstream's data area (after the 16 MiB header);
# the plain exports stay past the header too.
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
median() { # values on stdin -> their median
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
lscpu | sed -n 's/^Model name: *//p' | head -1
echo "nbdcryptd: $DAEMON${DAEMON_B:+ (A), $DAEMON_B (B)}"
echo "data: $MIB MiB, nbdkit memory upstream on a Unix socket, $(nproc) CPUs," \
    "load $(cut -d' ' -f1-3 /proc/loadavg), $ROUNDS round(s) of ${RUNTIME:-15} s, medians"
head='%-18s %14s %14s %7s %14s %7s'
[ -n "$DAEMON_B" ] && head="$head %14s %7s %14s %7s"
[ -z "${NO_LOCAL:-}" ] && head="$head %14s"
# shellcheck disable=SC2059
printf "$head\n" test direct-nbdkit plain-over-it ratio crypt-over-it ratio \
    ${DAEMON_B:+plain-B ratio crypt-B ratio} ${LOCAL:+crypt-on-shm}
for t in "seq-write write 1M 4" "seq-read read 1M 4" "4k-randread-QD32 randread 4k 32" \
    "4k-randwrite-QD32 randwrite 4k 32"; do
    set -- $t
    : > "$DIR/d"; : > "$DIR/p"; : > "$DIR/o"; : > "$DIR/pb"; : > "$DIR/ob"; : > "$DIR/l"
    r=0
    while [ $r -lt "$ROUNDS" ]; do
        r=$((r + 1))
        fio_run "$UP" "$1" "$2" "$3" "$4" 16M >> "$DIR/d"
        fio_run "$PLAIN" "$1" "$2" "$3" "$4" 16M >> "$DIR/p"
        fio_run "$OURS" "$1" "$2" "$3" "$4" 0 >> "$DIR/o"
        if [ -n "$DAEMON_B" ]; then
            fio_run "$PLAIN_B" "$1" "$2" "$3" "$4" 16M >> "$DIR/pb"
            fio_run "$OURS_B" "$1" "$2" "$3" "$4" 0 >> "$DIR/ob"
        fi
        [ -n "${NO_LOCAL:-}" ] || fio_run "$LOCAL" "$1" "$2" "$3" "$4" 0 >> "$DIR/l"
    done
    unit=MB/s; case "$2" in rand*) unit=IOPS ;; esac
    awk -v n="$1" -v d="$(median < "$DIR/d")" -v p="$(median < "$DIR/p")" \
        -v o="$(median < "$DIR/o")" -v pb="$(median < "$DIR/pb")" -v ob="$(median < "$DIR/ob")" \
        -v l="$(median < "$DIR/l")" -v u="$unit" -v b="$DAEMON_B" -v loc="${LOCAL:-}" 'BEGIN {
        printf "%-18s %9.1f %-4s %9.1f %-4s %6.1f%% %9.1f %-4s %6.1f%%", n, d, u, p, u, 100*p/d, o, u, 100*o/d
        if (b != "") printf " %9.1f %-4s %6.1f%% %9.1f %-4s %6.1f%%", pb, u, 100*pb/d, ob, u, 100*ob/d
        if (loc != "") printf " %9.1f %-4s", l, u
        printf "\n" }'
done
