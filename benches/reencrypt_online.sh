#!/bin/sh
# Online volume-key re-encryption under client load, one volume in /dev/shm:
#   A: fio 4k random read/write, QD32, 20 s, through nbdcryptd (the reference);
#   B: the same fio run while `nbdcryptctl reencrypt --control` re-encrypts the volume
#      (unthrottled: only the daemon's automatic back-off under client load).
# Prints client IOPS of both runs and their ratio, and the re-encryption rate during B and
# alone (after fio stopped). A benchmark, not a test: prints, asserts nothing.
# Usage: benches/reencrypt_online.sh [DATA_MiB] [BINDIR]   (default 1024 MiB, target/release;
#        build with `cargo build --release --bin nbdcryptd --bin nbdcryptctl`)
set -eu
MIB=${1:-1024}
BIN=${2:-target/release}
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)
DIR=$(mktemp -d /dev/shm/nbdcrypt-reenc-online.XXXXXX)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
printf 'bench-passphrase' > "$DIR/key"
IMG="$DIR/vol.img"
truncate -s $((16 + MIB))M "$IMG"
"$CS" luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file "$DIR/key" "$IMG"
dd if=/dev/urandom of="$IMG" bs=1M seek=16 count="$MIB" conv=notrunc status=none
"$BIN/nbdcryptd" --volume "$IMG" --unix "$DIR/nbd.sock" --control "$DIR/ctl.sock" \
    --unlock-key-file "$DIR/key" 2> "$DIR/daemon.log" &
PID=$!
i=0
until "$BIN/nbdcryptctl" status --control "$DIR/ctl.sock" 2>/dev/null | grep -q unlocked; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$DIR/daemon.log"; exit 1; }; sleep 0.1
done
URI="nbd+unix:///nbdcrypt?socket=$DIR/nbd.sock"
fio_iops() {
    fio --ioengine=nbd --uri="$URI" --name=qd32 --rw=randrw --bs=4k --iodepth=32 \
        --size="${MIB}M" --time_based --runtime=20 --output-format=json \
        --output="$DIR/fio.json" > /dev/null
    jq '.jobs[0].read.iops + .jobs[0].write.iops' "$DIR/fio.json"
}
unused_done_bytes() {
    "$BIN/nbdcryptctl" status --json --control "$DIR/ctl.sock" | jq '.reencrypt.done_bytes // 0'
}
lscpu | sed -n 's/^Model name: *//p' | head -1
lscpu | sed -n 's/^CPU family: *//p; s/^Model: *//p' | tr '\n' ' '; echo "(family, model)"
echo "data: $MIB MiB in /dev/shm, $(nproc) CPUs; load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
A=$(fio_iops)
state() {
    "$BIN/nbdcryptctl" status --json --control "$DIR/ctl.sock" | jq -r '.reencrypt.state // "none"'
}
# B: fio from the start of the re-encryption until it finishes (SIGINT makes fio stop and
# report), so the IOPS cover exactly the time both ran.
fio --ioengine=nbd --uri="$URI" --name=qd32 --rw=randrw --bs=4k --iodepth=32 \
    --size="${MIB}M" --time_based --runtime=600 --output-format=json \
    --output="$DIR/fio-b.json" > /dev/null &
FIO=$!
sleep 1
"$BIN/nbdcryptctl" reencrypt --control "$DIR/ctl.sock" --key-file "$DIR/key" > /dev/null
t0=$(date +%s.%N)
while [ "$(state)" != finished ]; do sleep 0.1; done
t1=$(date +%s.%N)
kill -INT $FIO; wait $FIO || true
B=$(sed -n '/^{/,$p' "$DIR/fio-b.json" | jq '.jobs[0].read.iops + .jobs[0].write.iops')
# C: the same re-encryption with no client I/O (a second one: the volume is re-keyed again).
"$BIN/nbdcryptctl" reencrypt --control "$DIR/ctl.sock" --key-file "$DIR/key" > /dev/null
t2=$(date +%s.%N)
while [ "$(state)" != finished ]; do sleep 0.1; done
t3=$(date +%s.%N)
echo "$A $B $t0 $t1 $t2 $t3 $MIB" | awk '{
    printf "fio 4k randrw QD32, no re-encryption      %10.0f IOPS\n", $1;
    printf "fio 4k randrw QD32, during re-encryption  %10.0f IOPS  (%.0f %% of the reference)\n", $2, 100*$2/$1;
    printf "re-encryption under fio                   %10.1f MB/s  (%d MiB in %.1f s)\n", $7*1.048576/($4-$3), $7, $4-$3;
    printf "re-encryption alone                       %10.1f MB/s  (%d MiB in %.1f s)\n", $7*1.048576/($6-$5), $7, $6-$5;
}'
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
