#!/bin/bash
# peerbench.sh: nbdcryptd against nbdkit's file plugin, end to end (a benchmark, not a test).
#
# Three servers, each on a Unix socket with its own backing file in /dev/shm, all running at once
# but measured one at a time, in the same run:
#   nbdkit   nbdkit file FILE                     (the plain reference: 16 threads, buffered I/O)
#   plain    nbdcryptd --plain FILE               (our protocol path without encryption)
#   enc      nbdcryptd --volume IMG               (LUKS2, aes-xts-plain64 512-bit key, 4096-byte
#                                                  sectors, made by cryptsetup)
# Client: fio's nbd engine (libnbd), one NBD connection per fio job. Workloads: 1 MiB sequential
# write and read QD8, 4 KiB random read and write QD32 with 1 and 2 jobs. Every volume is filled
# once first (so every block really is allocated and encrypted). Then ROUNDS rounds; in each
# round every workload runs on every server, the server order rotating from round to round so
# that drifts in the machine's load hit every server alike. Reported: the median over rounds of
# the throughput, the ratios to nbdkit, and the server's CPU time per I/O (utime+stime of the
# server process, all its threads, from /proc/PID/stat around each fio run, divided by the I/Os
# fio completed), with the 1-minute load average sampled at the start of every fio run: on a
# shared machine (other people compiling) the throughput columns move with the load, the CPU per
# I/O column much less.
#
# usage: scripts/peerbench.sh [ROUNDS] [RUNTIME_S] [SIZE_MiB]     (defaults 3, 8, 1024)
#   env: NBDCRYPTD=path (default $CARGO_TARGET_DIR or target, release/nbdcryptd; build it with
#        `cargo build --release --bin nbdcryptd`), KEEP=1 keeps the work dir,
#        WORKLOADS="seqwrite seqread ..." to run a subset, SERVERS="nbdkit plain enc";
#        NBDCRYPTD_BASE=path adds plain-base and enc-base (the same two servers from another
#        build, e.g. before a change) to the default SERVERS, for a before/after in one run.
# needs: fio (with the nbd engine), nbdkit, cryptsetup, python3, nbdinfo (libnbd-bin).
set -euo pipefail
ROUNDS=${1:-3}
RUNTIME=${2:-8}
SIZE_MIB=${3:-1024}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NBDCRYPTD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/nbdcryptd}
[ -x "$BIN" ] || { echo "no release nbdcryptd at $BIN: cargo build --release --bin nbdcryptd" >&2; exit 1; }
CS=$(command -v cryptsetup || echo /usr/sbin/cryptsetup)
WORKLOADS=${WORKLOADS:-"seqwrite seqread randread-j1 randread-j2 randwrite-j1 randwrite-j2"}
BASE=${NBDCRYPTD_BASE:-}
SERVERS=${SERVERS:-"nbdkit plain enc${BASE:+ plain-base enc-base}"}
W=$(mktemp -d /dev/shm/nbdcrypt-peerbench.XXXXXX)
declare -A PID=()
cleanup() {
  for p in "${PID[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

fio_args() {
  case $1 in
    seqwrite) echo "--rw=write --bs=1M --iodepth=8 --numjobs=1" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=8 --numjobs=1" ;;
    randread-j1) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=1" ;;
    randread-j2) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=2" ;;
    randwrite-j1) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=1" ;;
    randwrite-j2) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=2" ;;
    *) echo "unknown workload $1" >&2; exit 2 ;;
  esac
}

# Backing files: raw ones sparse, the LUKS2 one with its 16 MiB header in front.
printf 'peerbench-pass' > "$W/key"
for s in $SERVERS; do
  case $s in
    enc*)
      truncate -s $((16 + SIZE_MIB))M "$W/$s.img"
      "$CS" luksFormat -q --type luks2 --cipher aes-xts-plain64 --key-size 512 --sector-size 4096 \
        --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$W/key" "$W/$s.img" ;;
    *) truncate -s "${SIZE_MIB}M" "$W/$s.img" ;;
  esac
done

declare -A URI=()
for s in $SERVERS; do
  URI[$s]="nbd+unix:///nbdcrypt?socket=$W/$s.sock"
  b=$BIN
  [ "${s%-base}" = "$s" ] || { b=$BASE; [ -x "$b" ] || { echo "$s needs NBDCRYPTD_BASE" >&2; exit 2; }; }
  case $s in
    nbdkit) URI[$s]="nbd+unix:///?socket=$W/$s.sock"
            nbdkit -f -U "$W/$s.sock" file "$W/$s.img" 2>"$W/$s.log" & ;;
    plain|plain-base) "$b" --plain "$W/$s.img" --unix "$W/$s.sock" --control "$W/$s.ctl" \
             --log-level warn 2>"$W/$s.log" & ;;
    enc|enc-base) "$b" --volume "$W/$s.img" --unlock-key-file "$W/key" --unix "$W/$s.sock" \
           --control "$W/$s.ctl" --log-level warn 2>"$W/$s.log" & ;;
    *) echo "unknown server $s" >&2; exit 2 ;;
  esac
  PID[$s]=$!
done
for s in $SERVERS; do
  for i in $(seq 300); do
    nbdinfo --size "${URI[$s]}" >/dev/null 2>&1 && break
    [ "$i" -lt 300 ] || { echo "$s did not come up:" >&2; cat "$W/$s.log" >&2; exit 1; }
    sleep 0.1
  done
  sz=$(nbdinfo --size "${URI[$s]}")
  [ "$sz" = $((SIZE_MIB << 20)) ] || echo "warning: $s exports $sz bytes, not $((SIZE_MIB << 20))" >&2
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
# one fio run of workload $2 against server $1 in round $3; appends a line to runs.tsv
run() {
  local s=$1 w=$2 r=$3 json="$W/$1-$2-r$3.json" c0 c1 load
  load=$(cut -d' ' -f1 /proc/loadavg)
  c0=$(cpu_ticks "${PID[$s]}")
  # shellcheck disable=SC2046
  fio --name="$w" --ioengine=nbd --uri="${URI[$s]}" --size="${SIZE_MIB}M" $(fio_args "$w") \
    --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --group_reporting \
    --output-format=json --output="$json" >/dev/null
  c1=$(cpu_ticks "${PID[$s]}")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$s" "$w" $((c1 - c0)) "$load" "$json" >> "$W/runs.tsv"
}

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') (family $(lscpu | sed -n 's/^CPU family: *//p')" \
  "model $(lscpu | sed -n 's/^Model: *//p')), $(nproc) CPUs;" \
  "fio $(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), nbdcryptd $BIN${BASE:+, base $BASE}"
echo "$ROUNDS rounds x $RUNTIME s, $SIZE_MIB MiB volumes in /dev/shm; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "(the machine is shared: other work running at the same time shows in the load column)"

# Fill every volume once (not measured).
for s in $SERVERS; do
  fio --name=fill --ioengine=nbd --uri="${URI[$s]}" --size="${SIZE_MIB}M" --rw=write --bs=1M \
    --iodepth=8 --output-format=json --output="$W/$s-fill.json" >/dev/null
done

read -r -a SV <<< "$SERVERS"
for r in $(seq "$ROUNDS"); do
  for w in $WORKLOADS; do
    for k in "${!SV[@]}"; do
      run "${SV[$(( (k + r - 1) % ${#SV[@]} ))]}" "$w" "$r"
    done
  done
  echo "round $r done, load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

python3 - "$W/runs.tsv" "$TICK" <<'EOF'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
tick = int(sys.argv[2])
res = {}  # (workload, server) -> list of (value, cpu_us_per_io, load)
for r, s, w, ticks, load, path in rows:
    j = json.load(open(path))
    ios = sum(job[d]["total_ios"] for job in j["jobs"] for d in ("read", "write"))
    by = sum(job[d]["io_bytes"] for job in j["jobs"] for d in ("read", "write"))
    secs = max(job["elapsed"] for job in j["jobs"]) or 1
    seq = w.startswith("seq")
    val = by / secs / 2**20 if seq else ios / secs
    cpu = int(ticks) * 1e6 / tick / max(ios, 1)
    res.setdefault((w, s), []).append((val, cpu, float(load)))
ws = list(dict.fromkeys(w for _, _, w, *_ in rows))
ss = list(dict.fromkeys(s for _, s, *_ in rows))
med = lambda k, i: statistics.median(x[i] for x in res[k])
names = {"seqwrite": "1 MiB seq write QD8", "seqread": "1 MiB seq read QD8",
         "randread-j1": "4k rand read QD32, 1 job", "randread-j2": "4k rand read QD32, 2 jobs",
         "randwrite-j1": "4k rand write QD32, 1 job", "randwrite-j2": "4k rand write QD32, 2 jobs"}
unit = lambda w: "MiB/s" if w.startswith("seq") else "IOPS"
fmt = lambda w, v: f"{v:.0f} MiB/s" if w.startswith("seq") else f"{v/1000:.1f}k"
hdr = ["case"] + ss
if "nbdkit" in ss:
    hdr += [f"{s} / nbdkit" for s in ss if s != "nbdkit"]
hdr += [f"CPU µs/I/O {s}" for s in ss]
if "plain" in ss and "enc" in ss:
    hdr += ["CPU enc / plain"]
if "plain-base" in ss and "enc-base" in ss:
    hdr += ["CPU plain / plain-base", "CPU enc / enc-base"]
hdr += ["load avg (min–max)"]
print()
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for w in ws:
    cells = [names.get(w, w)] + [fmt(w, med((w, s), 0)) for s in ss]
    if "nbdkit" in ss:
        cells += [f"{med((w, s), 0) / med((w, 'nbdkit'), 0):.2f}×" for s in ss if s != "nbdkit"]
    cells += [f"{med((w, s), 1):.1f}" if med((w, s), 1) < 100 else f"{med((w, s), 1):.0f}" for s in ss]
    if "plain" in ss and "enc" in ss:
        cells += [f"{med((w, 'enc'), 1) / med((w, 'plain'), 1):.2f}×"]
    if "plain-base" in ss and "enc-base" in ss:
        cells += [f"{med((w, s), 1) / med((w, s + '-base'), 1):.2f}×" for s in ("plain", "enc")]
    loads = [x[2] for s in ss for x in res[(w, s)]]
    cells += [f"{min(loads):.1f}–{max(loads):.1f}"]
    print("| " + " | ".join(cells) + " |")
print()
print("medians over rounds; per-round values (throughput / CPU µs per I/O / load):")
for w in ws:
    for s in ss:
        print(f"  {w:13} {s:7} " + "  ".join(f"{v:.0f}/{c:.1f}/{l:.1f}" for v, c, l in res[(w, s)]))
EOF
