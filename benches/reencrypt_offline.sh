#!/bin/sh
# Offline volume-key re-encryption throughput, one run each on the same image in /dev/shm:
#   dd copy of the data area (the memory-bandwidth reference), `cryptsetup reencrypt`
#   (cryptsetup's own offline re-key, checksum resilience) and `nbdcryptctl reencrypt`
#   (checksum, journal, none). A benchmark, not a test: prints a table, asserts nothing.
# Usage: benches/reencrypt_offline.sh [DATA_MiB] [NBDCRYPTCTL]   (default 1024 MiB,
#        target/release/nbdcryptctl; build it with `cargo build --release -p nbdcryptctl`)
set -eu
MIB=${1:-1024}
CTL=${2:-target/release/nbdcryptctl}
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
now() { date +%s.%N; }
rate() { awk -v m="$MIB" -v t="$1" -v l="$2" 'BEGIN { printf "%-40s %8.2f s %9.1f MB/s\n", l, t, m*1.048576/t }'; }
lscpu | sed -n 's/^Model name: *//p' | head -1
echo "data: $MIB MiB in /dev/shm, $(nproc) CPUs"
t=$(now); dd if="$IMG" of="$DIR/copy" bs=4M skip=4 count=$((MIB / 4)) status=none; e=$(now)
rate "$(echo "$e - $t" | bc)" "dd copy (bs=4M)"
rm -f "$DIR/copy"
cp "$IMG" "$DIR/cs.img"
t=$(now); "$CS" reencrypt -q --force-offline-reencrypt --resilience checksum --pbkdf pbkdf2 \
    --pbkdf-force-iterations 1000 --key-file "$DIR/key" "$DIR/cs.img"; e=$(now)
rate "$(echo "$e - $t" | bc)" "cryptsetup reencrypt (checksum)"
rm -f "$DIR/cs.img"
for run in "checksum 64M" "checksum 16M" "journal 16M" "none 64M" "none 16M"; do
    set -- $run
    cp "$IMG" "$DIR/our.img"
    t=$(now); "$CTL" reencrypt -q --resilience "$1" --hotzone-size "$2" --key-file "$DIR/key" "$DIR/our.img"; e=$(now)
    rate "$(echo "$e - $t" | bc)" "nbdcryptctl reencrypt ($1, zone $2)"
    rm -f "$DIR/our.img"
done
