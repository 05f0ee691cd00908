#!/usr/bin/env bash
# The test command: installs the NBD clients the black-box tests drive, builds every binary,
# then runs the whole workspace test suite. Usage: ./scripts/test.sh [extra `cargo test` args]
# Works on a fresh Debian 12 machine as root (or with sudo); reruns skip apt when every tool is
# already present.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A PKG=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit [fio]=fio
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils
  [cryptsetup]=cryptsetup-bin [jq]=jq [socat]=socat [cmp]=diffutils
  [sqlite3]=sqlite3 [pg_ctlcluster]=postgresql [pgbench]=postgresql-contrib
)

missing=()
for t in "${!PKG[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("${PKG[$t]}")
done
# nbdsh needs the Python binding, for Debian's python3.
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
  missing+=(python3-libnbd)
fi
# fio must have been built with its libnbd engine.
if command -v fio >/dev/null 2>&1 && ! fio --enghelp=nbd >/dev/null 2>&1; then
  missing+=(fio)
fi

# TEST_SH_FORCE_APT=1 runs the install step even when everything is present.
if ((${#missing[@]})) || [ -n "${TEST_SH_FORCE_APT:-}" ]; then
  # shellcheck disable=SC2207
  pkgs=($(printf '%s\n' "${missing[@]}" "${PKG[@]}" python3-libnbd | sort -u))
  echo "test.sh: installing ${pkgs[*]}" >&2
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${pkgs[@]}"
fi

for t in "${!PKG[@]}"; do
  command -v "$t" >/dev/null 2>&1 || { echo "test.sh: $t still missing after apt-get" >&2; exit 1; }
done

# The black-box tests run the real binaries from target/debug.
cargo build --workspace --bins
# Two cores: run test binaries' tests two at a time (default would be the same, but make it
# explicit so a bigger machine does not start dozens of daemons and fio jobs at once).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
exec cargo test --workspace --no-fail-fast "$@"
