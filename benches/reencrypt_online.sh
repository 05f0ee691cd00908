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
        --size="${MIB}M" --time_based --runtime=20 --output-format=json > "$DIR/fio.json"
    jq '.jobs[0].read.iops + .jobs[0].write.iops' "$DIR/fio.json"
}
done_bytes() {
    "$BIN/nbdcryptctl" status --json --control "$DIR/ctl.sock" | jq '.reencrypt.done_bytes // 0'
}
lscpu | sed -n 's/^Model name: *//p' | head -1
echo "data: $MIB MiB in /dev/shm, $(nproc) CPUs"
A=$(fio_iops)
"$BIN/nbdcryptctl" reencrypt --control "$DIR/ctl.sock" --key-file "$DIR/key" > /dev/null
t0=$(date +%s.%N)
B=$(fio_iops)
t1=$(date +%s.%N)
d1=$(done_bytes)
until "$BIN/nbdcryptctl" status --json --control "$DIR/ctl.sock" | jq -e '.reencrypt.state == "finished"' > /dev/null; do
    sleep 0.2
done
t2=$(date +%s.%N)
echo "$A $B $d1 $t0 $t1 $t2 $MIB" | awk '{
    printf "fio 4k randrw QD32, no re-encryption      %10.0f IOPS\n", $1;
    printf "fio 4k randrw QD32, during re-encryption  %10.0f IOPS  (%.0f %% of the reference)\n", $2, 100*$2/$1;
    printf "re-encryption during fio                  %10.1f MB/s  (%.0f MiB in %.1f s)\n", $3/1e6/($5-$4), $3/1048576, $5-$4;
    rest = $7*1048576 - $3;
    if ($6 - $5 > 0.05 && rest > 0)
        printf "re-encryption alone (after fio)           %10.1f MB/s  (%.0f MiB in %.1f s)\n", rest/1e6/($6-$5), rest/1048576, $6-$5;
}'
