#!/bin/sh
# The cost of one more hop: fio against nbdcryptd's encrypted export over an nbdkit-memory
# upstream (nbdcryptd --volume nbd+unix://...) versus the same nbdkit served directly, same run:
#   1 MiB sequential write, 1 MiB sequential read, 4k random read and write at QD32.
# More targets split the cost, all over the same upstream and measured in the same rounds:
#   plain         `nbdcryptd --plain` (our hop alone, no encryption);
#   nbdkit-nbd    nbdkit's nbd plugin forwarding to the upstream (another project's pure
#                 forwarding hop: what one more hop costs anyone on this machine);
#   qemu-nbd      qemu-nbd serving an nbd+unix URI of the upstream (a second reference hop);
#   crypt-on-shm  nbdcryptd on a local LUKS2 file in /dev/shm (encryption, no upstream hop).
# Prints, per workload and target, the median MB/s or IOPS, the ratio against nbdkit served
# directly, and the CPU time per request of the serving process (the hop; for `direct` the
# upstream nbdkit itself) and of the upstream nbdkit during the same run: utime+stime of the whole
# process (all threads, exited ones too) from /proc/PID/stat around each fio run, divided by the
# requests fio completed. PERF=1 also counts the context switches per request of both (perf stat
# -e context-switches, which follows threads started during the run), the scheduler's share of a
# hop: a wakeup of a thread that was asleep costs one switch to it and one away from it.
# A benchmark, not a test.
#
# On a shared, loaded machine one run of each is noise: ROUNDS=n measures every target n times,
# interleaved (direct, hops, ours ... back to back, so load changes hit all of them alike),
# and prints the medians. DAEMON_B=path adds a second nbdcryptd build (its own plain and crypt
# exports over the same upstream, measured in the same rounds) for an A/B of two builds;
# ENV_B="VAR=value ..." runs the B daemons with those environment variables (e.g. DAEMON_B set
# to the same binary and ENV_B=NBDCRYPT_BENCH_UPSTREAM_CONNECTIONS=1 compares pool sizes).
#
# Usage: [RUNTIME=s] [ROUNDS=n] [NO_LOCAL=1] [NO_HOPS=1] [PERF=1] [DAEMON=path] [DAEMON_B=path]
#        [ENV_B="VAR=value ..."]
#        [TESTS="seq-write seq-read 4k-randread-QD32 4k-randwrite-QD32"]
#        benches/upstream.sh [DATA_MiB] [BINDIR]
#        (defaults: 15 s per run, 1 round, 1024 MiB, BINDIR target/release for nbdcryptd;
#        nbdcryptctl may be a debug build. Build with
#        `cargo build --release -p nbdcrypt --bin nbdcryptd`.) NO_LOCAL=1 skips the crypt-on-shm
#        target, NO_HOPS=1 the nbdkit-nbd and qemu-nbd hops; DAEMON=path runs that nbdcryptd
#        instead of BINDIR's.
set -eu
MIB=${1:-1024}
BIN=${2:-target/release}
CTL=${CTL:-$BIN/nbdcryptctl}
[ -x "$CTL" ] || CTL=target/debug/nbdcryptctl
DAEMON=${DAEMON:-$BIN/nbdcryptd}
DAEMON_B=${DAEMON_B:-}
RUN_ENV=
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
    # shellcheck disable=SC2086
    env $RUN_ENV "$1" --volume "$2" --unix "$DIR/$3.sock" --control "$DIR/$3.ctl" \
        --unlock-key-file "$DIR/key" > "$DIR/$3.out" 2> "$DIR/$3.log" &
    echo "$!" > "$DIR/$3.pid"
    i=0
    until "$CTL" status --control "$DIR/$3.ctl" 2>/dev/null | grep -q unlocked; do
        i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/$3.log" >&2; exit 1; }; sleep 0.1
    done
    echo "nbd+unix:///nbdcrypt?socket=$DIR/$3.sock"
}
plain() { # BINARY NAME: the upstream served unencrypted (the hop alone), its URI on stdout
    # shellcheck disable=SC2086
    env $RUN_ENV "$1" --plain "$UP" --unix "$DIR/$2.sock" > "$DIR/$2.out" 2> "$DIR/$2.log" &
    echo "$!" > "$DIR/$2.pid"
    i=0
    until [ -S "$DIR/$2.sock" ]; do
        i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/$2.log" >&2; exit 1; }; sleep 0.1
    done
    echo "nbd+unix:///nbdcrypt?socket=$DIR/$2.sock"
}
# Targets: NAME URI OFFSET PID, one a line. Exports of the whole upstream (direct, the reference
# hops, --plain) are measured past the 16 MiB LUKS2 header, over the same bytes as the encrypted
# exports' data area.
TARGETS="$DIR/targets"
echo "direct $UP 16M $NBDKIT" > "$TARGETS"
if [ -z "${NO_HOPS:-}" ]; then
    # nbdkit's nbd plugin: one upstream connection per client connection (shared=false).
    nbdkit -f -U "$DIR/nk.sock" nbd socket="$DIR/up.sock" 2> "$DIR/nk.log" &
    PIDS="$PIDS $!"; NK=$!
    # qemu-nbd: its nbd block driver as the client of the upstream; -t keeps serving after a
    # client leaves (fio connects once per run).
    qemu-nbd -t -f raw --socket "$DIR/qn.sock" "$UP" 2> "$DIR/qn.log" &
    PIDS="$PIDS $!"; QN=$!
    i=0
    until [ -S "$DIR/nk.sock" ] && [ -S "$DIR/qn.sock" ]; do
        i=$((i + 1)); [ $i -lt 100 ] || { cat "$DIR/nk.log" "$DIR/qn.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "nbdkit-nbd nbd+unix:///?socket=$DIR/nk.sock 16M $NK" >> "$TARGETS"
    echo "qemu-nbd nbd+unix:///?socket=$DIR/qn.sock 16M $QN" >> "$TARGETS"
fi
PLAIN=$(plain "$DAEMON" plain); PIDS="$PIDS $(cat "$DIR/plain.pid")"
echo "plain $PLAIN 16M $(cat "$DIR/plain.pid")" >> "$TARGETS"
OURS=$(crypt "$DAEMON" "$UP" crypt); PIDS="$PIDS $(cat "$DIR/crypt.pid")"
echo "crypt $OURS 0 $(cat "$DIR/crypt.pid")" >> "$TARGETS"
if [ -n "$DAEMON_B" ]; then
    RUN_ENV=${ENV_B:-}
    PLAIN_B=$(plain "$DAEMON_B" plainb); PIDS="$PIDS $(cat "$DIR/plainb.pid")"
    echo "plain-B $PLAIN_B 16M $(cat "$DIR/plainb.pid")" >> "$TARGETS"
    OURS_B=$(crypt "$DAEMON_B" "$UP" cryptb); PIDS="$PIDS $(cat "$DIR/cryptb.pid")"
    echo "crypt-B $OURS_B 0 $(cat "$DIR/cryptb.pid")" >> "$TARGETS"
    RUN_ENV=
fi
if [ -z "${NO_LOCAL:-}" ]; then
    truncate -s "$((16 + MIB))M" "$DIR/local.img"
    "$CTL" format "$DIR/local.img" --yes --key-file "$DIR/key" --pbkdf pbkdf2 \
        --pbkdf-force-iterations 1000 > /dev/null
    LOCAL=$(crypt "$DAEMON" "$DIR/local.img" local); PIDS="$PIDS $(cat "$DIR/local.pid")"
    echo "crypt-on-shm $LOCAL 0 $(cat "$DIR/local.pid")" >> "$TARGETS"
fi

ticks() { # PID -> utime+stime of the whole process, in clock ticks
    sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f12,13 | tr ' ' + | bc
}
perf_start() { # PID FILE: count context switches of PID (and threads it starts) into FILE
    perf stat -x, -e context-switches -p "$1" -o "$2" > /dev/null 2>&1 &
    echo $!
}
perf_count() { # FILE -> the count perf wrote
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        grep -q context-switches "$1" 2> /dev/null && break
        sleep 0.1
    done
    sed -n 's/^\([0-9]*\),.*context-switches.*/\1/p' "$1"
}
HZ=$(getconf CLK_TCK)
# fio_run NAME URI RW BS QD OFFSET PID: appends "value hop-us/req upstream-us/req [hop-cs/req
# upstream-cs/req]" to $DIR/res.NAME, value in MB/s or IOPS
fio_run() {
    h0=$(ticks "$7"); u0=$(ticks "$NBDKIT")
    if [ -n "${PERF:-}" ]; then
        ph=$(perf_start "$7" "$DIR/perf.hop"); pu=$(perf_start "$NBDKIT" "$DIR/perf.up")
        sleep 0.2
    fi
    fio --ioengine=nbd --uri="$2" --name="$1" --rw="$3" --bs="$4" --iodepth="$5" \
        --offset="$6" --size="${MIB}M" --time_based --runtime="${RUNTIME:-15}" --output-format=json \
        --output="$DIR/fio.json" > /dev/null
    h1=$(ticks "$7"); u1=$(ticks "$NBDKIT")
    cs=
    if [ -n "${PERF:-}" ]; then
        kill -INT "$ph" "$pu"; wait "$ph" "$pu" 2> /dev/null || true
        cs="$(perf_count "$DIR/perf.hop") $(perf_count "$DIR/perf.up")"
    fi
    case "$3" in
    write) v='.jobs[0].write.bw_bytes / 1e6' ;;
    read) v='.jobs[0].read.bw_bytes / 1e6' ;;
    randread) v='.jobs[0].read.iops' ;;
    *) v='.jobs[0].write.iops' ;;
    esac
    n=$(jq '.jobs[0].read.total_ios + .jobs[0].write.total_ios' "$DIR/fio.json")
    echo "$(jq "$v" "$DIR/fio.json") $h0 $h1 $u0 $u1 $n $cs" | awk -v hz="$HZ" '{
        printf "%s %.1f %.1f", $1, ($3 - $2) * 1e6 / hz / $6, ($5 - $4) * 1e6 / hz / $6
        if (NF > 6) printf " %.2f %.2f", $7 / $6, $8 / $6
        printf "\n" }' >> "$DIR/res.$1"
}
median() { # values on stdin -> their median
    sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
col() { # FILE N -> median of column N
    cut -d' ' -f"$2" "$1" | median
}
echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1)," \
    "family $(lscpu | sed -n 's/^CPU family: *//p' | head -1)" \
    "model $(lscpu | sed -n 's/^Model: *//p' | head -1)"
echo "nbdcryptd: $DAEMON${DAEMON_B:+ (A), $DAEMON_B (B: plain-B, crypt-B)}"
echo "data: $MIB MiB, nbdkit memory upstream on a Unix socket, $(nproc) CPUs," \
    "$ROUNDS round(s) of ${RUNTIME:-15} s, medians; CPU/req: the serving process's" \
    "utime+stime per request (direct: the upstream itself), and the upstream's"
[ -n "${PERF:-}" ] && echo "cs/req: context switches per request (perf stat), same processes"
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
hdr='%-18s %-13s %14s %7s %11s %11s'
[ -n "${PERF:-}" ] && hdr="$hdr %9s %9s"
# shellcheck disable=SC2059
printf "$hdr\n" test target median ratio CPU/req up-CPU/req ${PERF:+cs/req up-cs/req}
for t in "seq-write write 1M 4" "seq-read read 1M 4" "4k-randread-QD32 randread 4k 32" \
    "4k-randwrite-QD32 randwrite 4k 32"; do
    set -- $t
    case " ${TESTS:-$1} " in *" $1 "*) ;; *) continue ;; esac
    rm -f "$DIR"/res.*
    r=0
    while [ $r -lt "$ROUNDS" ]; do
        r=$((r + 1))
        while read -r name uri off pid; do
            fio_run "$name" "$uri" "$2" "$3" "$4" "$off" "$pid" < /dev/null
        done < "$TARGETS"
    done
    unit=MB/s; case "$2" in rand*) unit=IOPS ;; esac
    d=$(col "$DIR/res.direct" 1)
    while read -r name _ _ _; do
        f="$DIR/res.$name"
        v=$(col "$f" 1)
        line=$(printf '%-18s %-13s %9.1f %-4s %6.1f%% %8.1f us %8.1f us' "$1" "$name" "$v" \
            "$unit" "$(echo "100 * $v / $d" | bc -l)" "$(col "$f" 2)" "$(col "$f" 3)")
        [ -n "${PERF:-}" ] && line="$line $(printf '%9.2f %9.2f' "$(col "$f" 4)" "$(col "$f" 5)")"
        echo "$line"
    done < "$TARGETS"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
