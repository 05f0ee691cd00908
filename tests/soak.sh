#!/usr/bin/env bash
# Soak and memory: 8 NBD connections × QD128 of fio (nbd engine) with verify=crc32c against the
# encrypted export for SOAK_SECONDS (default 600), then a verify pass over everything written.
# Reports fio's errors (must be 0), the daemon's peak RSS (VmHWM) against the documented bound
# (README, Protocol: 64 MiB + --max-server-bytes + per connection a 256 KiB reader and at most
# 16 MiB + 128 KiB of idle buffers + per worker thread a 260 KiB ciphertext chunk), and that the daemon kept
# serving. Not a timed test: run it by
# hand (numbers for closing notes and the README). Exit status 0 only when every check holds.
#
# Usage (root): tests/soak.sh
# Environment: SOAK_SECONDS (600), JOBS (8), IODEPTH (128), VOLUME_SIZE (2G, the data area),
#   MAX_SERVER_BYTES (256M), BS (4k-1m mix), NBDCRYPTD / NBDCRYPTCTL (default: target/release
#   if built, else target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SOAK_SECONDS:-600}
JOBS=${JOBS:-8}
DEPTH=${IODEPTH:-128}
SIZE=${VOLUME_SIZE:-2G}
BUDGET=${MAX_SERVER_BYTES:-256M}
pick() { if [ -x "target/release/$1" ]; then echo "$PWD/target/release/$1"; else echo "$PWD/target/debug/$1"; fi; }
NBDCRYPTD=${NBDCRYPTD:-$(pick nbdcryptd)}
NBDCRYPTCTL=${NBDCRYPTCTL:-$(pick nbdcryptctl)}
for t in "$NBDCRYPTD" "$NBDCRYPTCTL" "$(command -v fio)" "$(command -v jq)" "$(command -v cryptsetup || echo /usr/sbin/cryptsetup)"; do
  [ -x "$t" ] || { echo "soak: missing $t (cargo build --release; ./scripts/test.sh installs fio, cryptsetup)" >&2; exit 1; }
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "soak: this fio has no nbd engine" >&2; exit 1; }
export PATH=$PATH:/usr/sbin

bytes() { numfmt --from=iec "$1"; }
W=$(mktemp -d /dev/shm/nbdcrypt-soak.XXXXXX 2>/dev/null || mktemp -d)
DAEMON=""
cleanup() { [ -n "$DAEMON" ] && kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
[ -n "${SOAK_KEEP:-}" ] && trap - EXIT

head -c 32 /dev/urandom > "$W/key"
truncate -s $(( $(bytes "$SIZE") + 16 * 1024 * 1024 )) "$W/volume.img"
cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
  --sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$W/key" "$W/volume.img"
"$NBDCRYPTD" --volume "$W/volume.img" --unix "$W/nbd.sock" --control "$W/control.sock" \
  --unlock-key-file "$W/key" --max-server-bytes "$BUDGET" --log-level warn 2>"$W/daemon.log" &
DAEMON=$!
for _ in $(seq 100); do [ -S "$W/nbd.sock" ] && "$NBDCRYPTCTL" status --control "$W/control.sock" 2>/dev/null | grep -q unlocked && break; sleep 0.1; done
"$NBDCRYPTCTL" status --control "$W/control.sock" | grep -q unlocked || { echo "soak: the daemon did not unlock" >&2; cat "$W/daemon.log" >&2; exit 1; }

uri="nbd+unix:///nbdcrypt?socket=$W/nbd.sock"
per_job=$(( $(bytes "$SIZE") / JOBS / 1048576 ))M
common=(--ioengine=nbd --uri="$uri" --numjobs="$JOBS" --iodepth="$DEPTH" --size="$per_job"
        --offset_increment="$per_job" --bssplit=4k/60:64k/30:1m/10 --group_reporting
        --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --output-format=json)
echo "soak: ${JOBS} connections x QD${DEPTH}, ${SECS}s of random writes with crc32c verify, then a full verify pass"
start=$(date +%s)
fio --name=soak-write --rw=randwrite --time_based --runtime="$SECS" --verify_backlog=4096 "${common[@]}" --output="$W/write.json" >/dev/null
fio --name=soak-verify --rw=read --verify_only "${common[@]}" --output="$W/verify.json" >/dev/null
end=$(date +%s)

errors=$(jq -s '[.[].jobs[].error] | add' "$W/write.json" "$W/verify.json")
wiops=$(jq '[.jobs[].write.iops] | add | floor' "$W/write.json")
wbw=$(jq '[.jobs[].write.bw] | add / 1024 | floor' "$W/write.json")
vbytes=$(jq '[.jobs[].read.io_bytes] | add / 1048576 | floor' "$W/verify.json")
hwm_kb=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON/status")
threads=16
bound_kb=$(( 64 * 1024 + $(bytes "$BUDGET") / 1024 + JOBS * (256 + 16 * 1024 + threads * 260) ))
aim_kb=$(( 64 * 1024 + $(bytes "$BUDGET") / 1024 ))
alive=yes; kill -0 "$DAEMON" 2>/dev/null || alive=no
cpu=$(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}')
echo "soak: $(( end - start )) s on $cpu ($(nproc) CPUs)"
echo "soak: write phase ${wiops} IOPS, ${wbw} MiB/s; verify pass read ${vbytes} MiB; fio errors (write + verify): ${errors}"
echo "soak: daemon peak RSS ${hwm_kb} KiB; documented bound ${bound_kb} KiB (64 MiB + max-server-bytes alone: ${aim_kb} KiB); alive: ${alive}"
grep -iE "panic|error" "$W/daemon.log" && { echo "soak: the daemon logged errors" >&2; exit 1; }
[ "$errors" -eq 0 ] && [ "$hwm_kb" -le "$bound_kb" ] && [ "$alive" = yes ] || { echo "soak: FAILED" >&2; exit 1; }
echo "soak: ok"
