#!/usr/bin/env bash
# The test command: installs the NBD clients the black-box tests drive, builds every binary,
# then runs the whole workspace test suite. Usage: ./scripts/test.sh [extra `cargo test` args]
# Works on a fresh Debian 12 machine as root (or with sudo); reruns skip apt when every tool is
# already present.
set -euo pipefail
cd "$(dirname "$0")/.."
# cryptsetup, losetup and umount live in sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

# tool -> Debian package
declare -A PKG=(
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit [fio]=fio
  [qemu-io]=qemu-utils [qemu-img]=qemu-utils
  [cryptsetup]=cryptsetup-bin [jq]=jq [socat]=socat [cmp]=diffutils
  [systemd-analyze]=systemd
  [softhsm2-util]=softhsm2 [pkcs11-tool]=opensc
  [losetup]=mount [mount]=mount [umount]=mount
  [gzip]=gzip
  [mkfs.ext4]=e2fsprogs [e2fsck]=e2fsprogs [debugfs]=e2fsprogs
  # tests/tests/kernel_client.rs: a qemu guest running the kernel's NBD client
  [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [mke2fs]=e2fsprogs [modprobe]=kmod
  [depmod]=kmod [xz]=xz-utils [flock]=util-linux
  [sqlite3]=sqlite3 [pg_ctlcluster]=postgresql [pgbench]=postgresql-contrib
  # the systemd attach unit's ExecStart (systemd-analyze verify checks that it exists)
  [nbd-client]=nbd-client
  # a bare Debian (debootstrap minbase) lacks these; CI's image has them
  [cc]=build-essential [pkg-config]=pkg-config [git]=git [curl]=curl [ps]=procps [python3]=python3
  [file]=file [update-ca-certificates]=ca-certificates [fsck.ext4]=e2fsprogs
  # unlock policies (issue 11): clevis/Tang/TPM2 interop against the real tools
  [/usr/libexec/tangd]=tang [tang-show-keys]=tang [clevis]=clevis [clevis-luks-bind]=clevis-luks
  [clevis-encrypt-tpm2]=clevis-tpm2 [swtpm]=swtpm [swtpm_setup]=swtpm-tools
  [tpm2_createprimary]=tpm2-tools
  # TLS (issue 12): certificates for the tests; nbdkit's S3 plugin (Python) over moto's S3 server
  [certtool]=gnutls-bin [openssl]=openssl
  [/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin]=nbdkit-plugin-python
  # observability (issue 13): a real Prometheus scrapes the daemon; `top` is driven in tmux
  [prometheus]=prometheus [promtool]=prometheus [tmux]=tmux
)

missing=()
for t in "${!PKG[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("${PKG[$t]}")
done
# nbdsh needs the Python binding, for Debian's python3.
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
  missing+=(python3-libnbd)
fi
# The encrypted-volume tests run shared/testdata/luks2/verify.py (the independent decryptor) with
# Debian's python3: it needs `cryptography`, and `argon2` (argon2-cffi) for argon2 keyslots.
# nbdkit's S3 plugin imports boto3 from Debian's python3.
PY_PKGS=(python3-cryptography python3-argon2 python3-boto3)
if ! /usr/bin/python3 -c 'import cryptography, argon2, boto3' >/dev/null 2>&1; then
  missing+=("${PY_PKGS[@]}")
fi
# ctl/tests/kms.rs makes a venv with moto's KMS server (pip, PyPI) on first use: whichever
# python3 is first on PATH needs venv and ensurepip (Debian's python3 gets them from python3-venv).
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
# fio must have been built with its libnbd engine.
if command -v fio >/dev/null 2>&1 && ! fio --enghelp=nbd >/dev/null 2>&1; then
  missing+=(fio)
fi

# The guest's initramfs needs a statically linked busybox (package busybox, if installed, is not).
case "$(ldd /bin/busybox 2>&1 || true)" in
  *"not a dynamic"*) ;;
  *) missing+=(busybox-static) ;;
esac

# TEST_SH_FORCE_APT=1 runs the install step even when everything is present.
if ((${#missing[@]})) || [ -n "${TEST_SH_FORCE_APT:-}" ]; then
  # shellcheck disable=SC2207
  pkgs=($(printf '%s\n' "${missing[@]}" "${PKG[@]}" python3-libnbd busybox-static "${PY_PKGS[@]}" | sort -u))
  echo "test.sh: installing ${pkgs[*]}" >&2
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  # Wait (up to 10 min) rather than fail if another apt/dpkg run holds the lock.
  APT=(apt-get -q -o DPkg::Lock::Timeout=600)
  "${SUDO[@]}" "${APT[@]}" update
  # The machine image ships qemu-utils 10.x from bookworm-backports without that apt source, and
  # Debian's qemu-system-x86 (7.2) cannot sit beside it: install both at the one version apt can
  # provide, downgrading qemu-utils if needed (the tests pass with either version).
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    "${SUDO[@]}" "${APT[@]}" install -y --no-install-recommends --allow-downgrades \
      "qemu-system-x86=$qver" "qemu-utils=$qver"
  fi
  "${SUDO[@]}" "${APT[@]}" install -y --no-install-recommends "${pkgs[@]}"
fi

for t in "${!PKG[@]}"; do
  command -v "$t" >/dev/null 2>&1 || { echo "test.sh: $t still missing after apt-get" >&2; exit 1; }
done

# The lint gate first (formatting, clippy -D warnings: unsafe only in the fenced modules, cast
# lints): it fails fast, before the long tests.
./scripts/lint.sh

# The black-box tests run the real binaries from target/debug.
cargo build --workspace --bins

# The kernel-client test's guest (Debian kernel + nbd-client .debs via apt-get download, cached
# in target/kernel-vm). Stale apt lists are the usual reason a download fails: update and retry.
guest=(tests/kernel-vm/build-guest.sh "${CARGO_TARGET_DIR:-target}/kernel-vm")
if ! "${guest[@]}" >/dev/null; then
  echo "test.sh: build-guest.sh failed; apt-get update and retry" >&2
  SUDO=()
  [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
  "${SUDO[@]}" apt-get update -q
  "${guest[@]}" >/dev/null
fi

# Fuzzing smoke (issue 8): builds fuzz/ with libFuzzer instrumentation on the stable toolchain,
# replays every kept finding (fuzz/regressions), then runs each of the 12 targets for 20 s;
# fails on any finding. NBDCRYPT_FUZZ_SECONDS changes the per-target time (0 skips the runs).
./scripts/fuzz.sh smoke "${NBDCRYPT_FUZZ_SECONDS:-20}"

# Two cores: run test binaries' tests two at a time (default would be the same, but make it
# explicit so a bigger machine does not start dozens of daemons and fio jobs at once).
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
exec cargo test --workspace --no-fail-fast "$@"
