#!/usr/bin/env bash
# Fuzzing nbdcrypt's decoders of untrusted input (issue 8) on the stable toolchain: libFuzzer
# (libfuzzer-sys) with SanitizerCoverage instrumentation added by fuzz/rustc-sancov; no nightly,
# no cargo-fuzz.
#
#   scripts/fuzz.sh smoke [SECONDS]   build, make seeds, replay fuzz/regressions, then run every
#                                     target for SECONDS (default 20) each; non-zero on any finding
#   scripts/fuzz.sh run TARGET SECONDS [libFuzzer flags...]
#                                     one long run; corpus grows in fuzz/corpus/TARGET, a finding
#                                     lands in fuzz/artifacts/TARGET/ (copy it to fuzz/regressions/TARGET/)
#   scripts/fuzz.sh replay            run every target once over fuzz/regressions and the seeds
#                                     (and report on fuzz/open: findings whose fix is pending)
#   scripts/fuzz.sh build | seeds | list
#
# Needs: a C++ compiler (libfuzzer-sys builds libFuzzer), python3 (seeds), the LUKS2 test
# vectors ($NBDCRYPT_LUKS2_TESTDATA, default /work/shared/testdata/luks2; LUKS2 seeds are skipped
# without them). One process per target, one at a time (-jobs/-fork unused): the machine is shared.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ=$ROOT/fuzz
export CARGO_TARGET_DIR=${NBDCRYPT_FUZZ_TARGET_DIR:-$FUZZ/target}
export RUSTC_WRAPPER=$FUZZ/rustc-sancov
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
BIN=$CARGO_TARGET_DIR/release

TARGETS=(luks2_header luks2_json_raw luks2_json_model luks2_image_unlock nbd_handshake
    nbd_transmission nbd_session_model control_proto seal_token pkcs11_uri config_toml xts_diff metrics_http
    luks2_reencrypt clevis_token upstream_reply tls_certificates sha256_blocks_diff)

max_len() {
    case $1 in
    luks2_image_unlock) echo 600000 ;;
    luks2_header) echo 140000 ;;
    luks2_json_raw) echo 65536 ;;
    nbd_transmission | nbd_handshake) echo 65536 ;;
    tls_certificates) echo 16384 ;;
    *) echo 8192 ;;
    esac
}

build() {
    (cd "$FUZZ" && cargo build --release --locked --features libfuzzer --bins)
}

seeds() {
    python3 "$FUZZ/make_seeds.py"
}

# libFuzzer flags common to every run. -timeout: one input may take at most 10 s (KDFs are
# capped well below that); -rss_limit_mb: hostile lengths must not buy gigabytes.
common_flags() {
    local t=$1
    echo -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$FUZZ/artifacts/$t/"
}

replay() {
    local rc=0 t files
    for t in "${TARGETS[@]}"; do
        mkdir -p "$FUZZ/artifacts/$t"
        files=()
        for d in "$FUZZ/regressions/$t" "$FUZZ/seeds/$t"; do
            [ -d "$d" ] || continue
            while IFS= read -r -d '' f; do files+=("$f"); done < <(find "$d" -type f ! -name '*.md' -print0)
        done
        [ ${#files[@]} -gt 0 ] || continue
        # With file arguments libFuzzer runs each input once and exits non-zero on a crash.
        if ! "$BIN/$t" $(common_flags "$t") "${files[@]}" >"$FUZZ/artifacts/$t/replay.log" 2>&1; then
            echo "fuzz: $t: a regression or seed input fails; see fuzz/artifacts/$t/replay.log" >&2
            tail -30 "$FUZZ/artifacts/$t/replay.log" >&2
            rc=1
        else
            echo "fuzz: $t: ${#files[@]} regression/seed inputs replay clean"
        fi
    done
    # Open findings (fuzz/open/TARGET/*: reported, fix owned elsewhere) are replayed for
    # information only: they do not fail the run until moved to fuzz/regressions/.
    for t in "${TARGETS[@]}"; do
        [ -d "$FUZZ/open/$t" ] || continue
        while IFS= read -r -d '' f; do
            if "$BIN/$t" $(common_flags "$t") "$f" >/dev/null 2>&1; then
                echo "fuzz: $t: open finding ${f#"$FUZZ"/} no longer reproduces: move it to fuzz/regressions/$t/"
            else
                echo "fuzz: $t: open finding ${f#"$FUZZ"/} still reproduces (known, see its .md)"
            fi
        done < <(find "$FUZZ/open/$t" -type f ! -name '*.md' -print0)
    done
    return $rc
}

run() {
    local t=$1 secs=$2
    shift 2
    [ -x "$BIN/$t" ] || { echo "fuzz: no target $t (scripts/fuzz.sh list)" >&2; return 2; }
    mkdir -p "$FUZZ/corpus/$t" "$FUZZ/artifacts/$t" "$FUZZ/seeds/$t" "$FUZZ/regressions/$t"
    # New inputs go to the first directory (corpus); seeds and regressions are read only.
    "$BIN/$t" $(common_flags "$t") -max_total_time="$secs" "$@" \
        "$FUZZ/corpus/$t" "$FUZZ/seeds/$t" "$FUZZ/regressions/$t"
}

smoke() {
    local secs=${1:-20} rc=0 t log
    build
    seeds
    replay || rc=1
    # 0 seconds: replay only (libFuzzer would read -max_total_time=0 as "no limit").
    [ "$secs" -gt 0 ] || return $rc
    for t in "${TARGETS[@]}"; do
        log=$FUZZ/artifacts/$t/smoke.log
        mkdir -p "$FUZZ/artifacts/$t"
        if run "$t" "$secs" >"$log" 2>&1; then
            echo "fuzz: $t: ${secs}s clean, $(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$') execs, corpus $(grep -Eo 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)"
        else
            echo "fuzz: $t: FINDING, input in fuzz/artifacts/$t/ (log: $log)" >&2
            grep -A25 -m1 -E 'panicked|ERROR: libFuzzer|==[0-9]+==' "$log" >&2 || tail -30 "$log" >&2
            rc=1
        fi
    done
    return $rc
}

case ${1:-} in
build) build ;;
seeds) seeds ;;
list) printf '%s\n' "${TARGETS[@]}" ;;
replay) build && seeds && replay ;;
smoke) smoke "${2:-20}" ;;
run)
    [ $# -ge 3 ] || { echo "usage: scripts/fuzz.sh run TARGET SECONDS [libFuzzer flags]" >&2; exit 2; }
    shift
    run "$@"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
