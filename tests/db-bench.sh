#!/usr/bin/env bash
# pgbench TPS of PostgreSQL on ext4 on nbdcrypt (encrypted) vs the same stack over `nbdkit file`
# (plain), in one run on one machine. Not run in CI; numbers for closing notes.
#
#   server → nbdfuse -C 1 → losetup --direct-io=on → ext4 (-b 4096) → PostgreSQL
#   (fsync=on, synchronous_commit=on, full_page_writes=on; pgbench -i -s SCALE, then
#   pgbench -c CLIENTS -j 2 -T SECONDS, RUNS times per stack, stacks interleaved)
#
# Usage (root): tests/db-bench.sh
# Environment: SECONDS_PER_RUN (30), SCALE (10), CLIENTS (4), RUNS (2), VOLUME_SIZE (1G),
#   NBDCRYPTD / NBDCRYPTCTL (default: target/release if built, else target/debug).
set -euo pipefail
cd "$(dirname "$0")/.."

T=${SECONDS_PER_RUN:-30}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
RUNS=${RUNS:-2}
SIZE=${VOLUME_SIZE:-1G}

pick() { # pick NAME: target/release/NAME if present, else target/debug/NAME
  if [ -x "target/release/$1" ]; then echo "$PWD/target/release/$1"; else echo "$PWD/target/debug/$1"; fi
}
NBDCRYPTD=${NBDCRYPTD:-$(pick nbdcryptd)}
NBDCRYPTCTL=${NBDCRYPTCTL:-$(pick nbdcryptctl)}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
for t in "$NBDCRYPTD" "$NBDCRYPTCTL" "$PGBIN/initdb" "$PGBIN/pg_ctl" "$PGBIN/pgbench" \
         "$(command -v nbdkit)" "$(command -v nbdfuse)" "$(command -v nbdinfo)"; do
  [ -n "$t" ] && [ -x "$t" ] || { echo "db-bench: missing tool ${t:-(nbdkit/nbdfuse/nbdinfo)}" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "db-bench: run as root (losetup, mount)" >&2; exit 1; }

W=""
SERVER_PID="" FUSE_PID="" LOOP=""
teardown() {
  [ -n "$W" ] || return 0
  if [ -f "$W/data/pg/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/data/pg" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  mountpoint -q "$W/data" && { umount "$W/data" 2>/dev/null || umount -l "$W/data"; }
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
  mountpoint -q "$W/fuse" && { umount "$W/fuse" 2>/dev/null || umount -l "$W/fuse"; }
  [ -n "$FUSE_PID" ] && { kill "$FUSE_PID" 2>/dev/null || true; wait "$FUSE_PID" 2>/dev/null || true; }
  [ -n "$SERVER_PID" ] && { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
  rm -rf "$W"
  W="" SERVER_PID="" FUSE_PID="" LOOP=""
}
trap teardown EXIT INT TERM

# bench MODE: one pgbench run on a fresh stack; sets RESULT to its TPS (not run in a subshell,
# so the EXIT trap tears down whatever a failure leaves behind)
bench() {
  local mode=$1
  W=$(mktemp -d /tmp/nbdcrypt-dbbench.XXXXXX)
  chmod 755 "$W"
  mkdir -p "$W/fuse" "$W/data" "$W/run"
  chown postgres: "$W/run"
  case $mode in
    nbdcrypt)
      head -c 64 /dev/urandom > "$W/key"
      "$NBDCRYPTCTL" format "$W/vol.img" --size "$SIZE" --key-file "$W/key" \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --yes >/dev/null
      "$NBDCRYPTD" --volume "$W/vol.img" --unix "$W/nbd.sock" --control "$W/ctl.sock" \
        --unlock-key-file "$W/key" 2>"$W/server.log" &
      SERVER_PID=$! ;;
    nbdkit-file)
      truncate -s "$SIZE" "$W/vol.img"
      nbdkit -f -U "$W/nbd.sock" file "$W/vol.img" 2>"$W/server.log" &
      SERVER_PID=$! ;;
  esac
  for _ in $(seq 200); do
    nbdinfo --size "nbd+unix:///?socket=$W/nbd.sock" >/dev/null 2>&1 && break
    sleep 0.1
  done
  nbdinfo --size "nbd+unix:///?socket=$W/nbd.sock" >/dev/null
  nbdfuse -C 1 "$W/fuse" --unix "$W/nbd.sock" 2>"$W/fuse.log" &
  FUSE_PID=$!
  for _ in $(seq 200); do [ -s "$W/fuse/nbd" ] && break; sleep 0.05; done
  LOOP=$(losetup -f --show --direct-io=on "$W/fuse/nbd")
  mkfs.ext4 -q -F -b 4096 "$LOOP"
  mount -t ext4 "$LOOP" "$W/data"
  mkdir "$W/data/pg" && chown postgres: "$W/data/pg"
  runuser -u postgres -- "$PGBIN/initdb" -D "$W/data/pg" -A trust -U postgres -E UTF8 \
    --no-instructions >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/data/pg" -l "$W/run/pg.log" -w -t 120 \
    -o "-c listen_addresses= -c unix_socket_directories=$W/run -c fsync=on -c synchronous_commit=on -c full_page_writes=on" \
    start >/dev/null
  "$PGBIN/pgbench" -h "$W/run" -U postgres -i -s "$SCALE" -q postgres >/dev/null 2>&1
  local out
  out=$("$PGBIN/pgbench" -h "$W/run" -U postgres -c "$CLIENTS" -j 2 -T "$T" postgres 2>&1)
  RESULT=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
  [ -n "$RESULT" ] || { echo "db-bench: no tps in pgbench output: $out" >&2; exit 1; }
  teardown
}

echo "db-bench: nbdcryptd=$NBDCRYPTD postgres=$PGBIN scale=$SCALE clients=$CLIENTS ${T}s x $RUNS runs" >&2
declare -A TPS=()
for r in $(seq "$RUNS"); do
  for mode in nbdcrypt nbdkit-file; do
    bench "$mode"
    tps=$RESULT
    echo "run $r  $mode  tps=$tps" >&2
    TPS[$mode]="${TPS[$mode]:-} $tps"
  done
done
printf '%-12s %s\n' stack "tps (pgbench -c $CLIENTS -T $T, scale $SCALE)"
for mode in nbdcrypt nbdkit-file; do
  printf '%-12s %s\n' "$mode" "${TPS[$mode]}"
done
