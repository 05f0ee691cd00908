#!/bin/bash
# bench-tls.sh: what TLS costs on the NBD path (a benchmark, not a test).
#
# Three servers on 127.0.0.1, the same file on tmpfs, the same client (nbdcopy, one connection):
#   tcp      nbdcryptd --plain FILE --tcp … --insecure-tcp        (reference)
#   tls      nbdcryptd --plain FILE --tcp … --tls require          (rustls, ring)
#   nbdkit   nbdkit --tls=require file FILE                        (GnuTLS), same certificates
# Workloads: 1 MiB sequential read and write; 4 KiB requests with 32 in flight, read and write.
# Each is run RUNS times per server, interleaved, and the median MB/s is printed with the ratio
# to plain TCP. --plain isolates the TLS cost from the XTS cost (which is the same on every
# transport). The client pays its own TLS (GnuTLS) in the tls and nbdkit rows.
#
# usage: scripts/bench-tls.sh [SIZE_MIB] [RUNS]   (needs a release build: cargo build --release)
set -euo pipefail
KEEP=${KEEP:-}
SIZE_MIB=${1:-256}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NBDCRYPTD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/nbdcryptd}
[ -x "$BIN" ] || { echo "no release nbdcryptd at $BIN: cargo build --release -p nbdcrypt" >&2; exit 1; }
W=$(mktemp -d /dev/shm/nbdcrypt-bench-tls.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; [ -n "$KEEP" ] || rm -rf "$W"; }
trap cleanup EXIT

# Certificates (the README recipe).
mkdir -p "$W/pki" "$W/server" "$W/client"
(
  cd "$W/pki"; umask 077
  # openssl, not certtool: certtool drops a leading zero byte of the scalar (1 key in 256), which rustls refuses.
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  key ca-key.pem
  printf 'cn = bench CA\nca\ncert_signing_key\nexpiration_days = 30\n' > ca.info
  certtool --generate-self-signed --no-text --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem 2>/dev/null
  key server-key.pem
  printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 30\n' > server.info
  certtool --generate-certificate --no-text --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
    --load-privkey server-key.pem --template server.info --outfile server-cert.pem 2>/dev/null
  cp ca-cert.pem server-cert.pem server-key.pem ../server/
  cp ca-cert.pem ../client/
)

head -c "${SIZE_MIB}M" /dev/urandom > "$W/src.bin"
# One copy per server: a file is served by one nbdcryptd at a time (the claim lock).
for s in a b c; do cp "$W/src.bin" "$W/disk-$s.img"; done
SMALL=$(( SIZE_MIB / 8 ))   # the 4 KiB runs move less data
head -c "${SMALL}M" "$W/src.bin" > "$W/small.bin"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P1=$(port); P2=$(port); P3=$(port)
"$BIN" --plain "$W/disk-a.img" --unix "$W/a.sock" --control "$W/a.ctl" --tcp 127.0.0.1:$P1 --insecure-tcp \
  --log-level warn 2>"$W/tcp.log" & PIDS+=($!)
"$BIN" --plain "$W/disk-b.img" --unix "$W/b.sock" --control "$W/b.ctl" --tcp 127.0.0.1:$P2 --tls require \
  --tls-certificates "$W/server" --log-level warn 2>"$W/tls.log" & PIDS+=($!)
nbdkit -f --exit-with-parent -i 127.0.0.1 -p $P3 --tls=require --tls-certificates="$W/server" \
  file "$W/disk-c.img" 2>"$W/nbdkit.log" & PIDS+=($!)
for p in $P1 $P2 $P3; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

declare -A URI=(
  [tcp]="nbd://127.0.0.1:$P1/nbdcrypt"
  [tls]="nbds://127.0.0.1:$P2/nbdcrypt?tls-certificates=$W/client"
  [nbdkit]="nbds://127.0.0.1:$P3/?tls-certificates=$W/client"
)
COPY=(nbdcopy -C 1 -T 1 --no-extents -S 0)

# seconds for one run of workload $1 against server $2
one() {
  local w=$1 u=${URI[$2]} t0 t1
  t0=$(date +%s.%N)
  case $w in
    seq-read)   "${COPY[@]}" --request-size=1048576 -R 4 "$u" null: ;;
    seq-write)  "${COPY[@]}" --request-size=1048576 -R 4 "$W/src.bin" "$u" ;;
    4k-read)    "${COPY[@]}" --request-size=4096 -R 32 "$u" null: ;;
    4k-write)   "${COPY[@]}" --request-size=4096 -R 32 "$W/small.bin" "$u" ;;
  esac
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
bytes() { case $1 in seq-*) echo $((SIZE_MIB << 20));; *) echo $((SMALL << 20));; esac; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "CPU: $(lscpu | sed -n "s/^Model name: *//p") (family $(lscpu | sed -n "s/^CPU family: *//p") model $(lscpu | sed -n "s/^Model: *//p")), $(nproc) CPUs; nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}'), nbdkit $(nbdkit --version | awk '{print $2}')"
echo "size: $SIZE_MIB MiB (seq) / $SMALL MiB (4k), runs: $RUNS, median MB/s (ratio to plain TCP)"
printf '%-10s %14s %22s %22s\n' workload "tcp (ref)" "nbdcryptd TLS" "nbdkit TLS"
for w in seq-read seq-write 4k-read 4k-write; do
  declare -A T=()
  for r in $(seq "$RUNS"); do
    for s in tcp tls nbdkit; do T[$s]+="$(one $w $s)"$'\n'; done
  done
  declare -A MB=()
  for s in tcp tls nbdkit; do
    m=$(printf '%s' "${T[$s]}" | median)
    MB[$s]=$(echo "$(bytes $w) / $m / 1000000" | bc -l)
  done
  printf '%-10s %14.0f %14.0f (%4.2f) %14.0f (%4.2f)\n' $w "${MB[tcp]}" "${MB[tls]}" \
    "$(echo "${MB[tls]} / ${MB[tcp]}" | bc -l)" "${MB[nbdkit]}" "$(echo "${MB[nbdkit]} / ${MB[tcp]}" | bc -l)"
  unset T MB
done
