#!/usr/bin/env bash
# The lint gate CI runs: formatting (rustfmt.toml) and clippy with every warning an error
# ([workspace.lints] in Cargo.toml: `unsafe` only in the three fenced modules, documented unsafe
# blocks, cast lints). Installs the rustfmt and clippy components through rustup when missing.
# Usage: ./scripts/lint.sh [extra `cargo clippy` args, e.g. --locked]
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
if ((${#missing[@]})); then
  if ! command -v rustup >/dev/null; then
    echo "lint.sh: ${missing[*]} missing and rustup not found: install the toolchain with rustup" \
      "(https://rustup.rs) or your distribution's ${missing[*]} package" >&2
    exit 1
  fi
  rustup component add "${missing[@]}"
fi

# Both run even when the first fails, so one CI run shows every problem.
status=0
echo "== cargo fmt --all --check" >&2
cargo fmt --all --check || { status=1; echo "lint.sh: not formatted: run \`cargo fmt --all\`" >&2; }
echo "== cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets "$@" -- -D warnings || status=1
exit "$status"
