//! The real Linux kernel NBD client against the real `nbdcryptd` serving an encrypted LUKS2
//! volume.
//!
//! This host's kernel has no `nbd` module, so the client runs in a qemu guest (TCG): Debian's
//! kernel and `nbd-client`, with our own `/init` (`tests/kernel-vm/init`), built by
//! `tests/kernel-vm/build-guest.sh` into `target/kernel-vm/` (cached). There is no IP networking:
//!
//! ```text
//! host:  nbdcryptd --unix nbd.sock  <── qemu -chardev socket,path=nbd.sock ── virtserialport "nbd"
//! guest: /dev/vport0p1 ⇄ socat ⇄ /run/nbd.sock ⇐ nbd-client -unix /run/nbd.sock /dev/nbd0 -N nbdcrypt -b 4096
//! ```
//!
//! The guest logs the queue limits the kernel chose, does raw O_DIRECT I/O, mkfs.ext4, mount,
//! write, sync, umount, mount, verify, fstrim, detach, and prints `NBDTEST: ALL OK`. The host then
//! checks that the kernel's writes went through the crypt layer: the volume file holds none of
//! the plaintext, and reading the export back decrypts to the ext4 file system the guest made.
//!
//! `kernel_client_over_tls_...` does the same over TLS: `nbd-client -certfile -keyfile
//! -cacertfile` against `--tls require --tls-verify-peer` on TCP (qemu's chardevs connect to the
//! TCP listener, one through a recording relay), after a plaintext `nbd-client` was refused.
//!
//! Prerequisites (installed by `scripts/test.sh`): qemu-system-x86, busybox-static, socat,
//! cpio, e2fsprogs, kmod, xz-utils, libnbd-bin, and apt lists that can download
//! `linux-image-*-amd64` and `nbd-client` (about 70 MB, once). A missing one fails the test.

#[path = "common/pki.rs"]
mod pki;

use nbdcrypt_tests::*;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `nbdcryptctl format --size`: 16 MiB of LUKS2 header + a 64 MiB data segment.
const VOLUME_FILE_SIZE: &str = "80M";
const EXPORT_SIZE: u64 = 64 * MIB;
/// The whole guest run (boot, test, power-off) must finish within this.
const QEMU_TIMEOUT: Duration = Duration::from_secs(300);
/// First run downloads ~70 MB and unpacks the kernel package.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// The ext4 label the guest gives the file system (plaintext in the superblock).
const FS_LABEL: &str = "nbdcrypt-kvm";

#[test]
fn kernel_client_ext4_on_encrypted_volume_with_discards() {
    kernel_client_run(true);
}

#[test]
fn kernel_client_ext4_on_encrypted_volume_without_discards() {
    kernel_client_run(false);
}

fn kernel_client_run(discards: bool) {
    let started = Instant::now();
    let qemu = require("qemu-system-x86_64", "qemu-system-x86");
    let guest = build_guest();

    // An encrypted volume made for this test, unlocked at start with its key file.
    let dir = tempdir();
    let (vol, key) = format_volume(dir.path());

    let sock = dir.path().join("nbd.sock");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--volume".into(),
        vol.clone().into(),
        "--unix".into(),
        sock.clone().into(),
        "--control".into(),
        dir.path().join("control.sock").into(),
        "--unlock-key-file".into(),
        key.clone().into(),
        // qemu connects when it starts; the guest sends its first handshake byte only after
        // booting, which can take long under TCG on a loaded machine.
        "--handshake-timeout".into(),
        "300".into(),
        // One debug line per request (header fields only, never payloads): the host side checks
        // what the kernel sent.
        "--log-level".into(),
        "info,nbdcrypt::nbd::session=debug".into(),
    ];
    if discards {
        args.push("--allow-discards".into());
    }
    let mut d = Daemon::start_in(dir, args);
    wait_for_log(&d, "unlocked with the key file", Duration::from_secs(30));

    // A marker only this run writes: the guest puts 2000 lines of it into /mnt/marker.txt.
    let marker = format!(
        "nbdcrypt-kvm-plaintext-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss
    // ticks and panic ("IO-APIC + timer doesn't work!"); the check is pointless in a VM.
    let append = format!(
        "console=ttyS0 panic=-1 loglevel=4 no_timer_check nbdtest.export={EXPORT} nbdtest.size={EXPORT_SIZE} \
         nbdtest.discard={} nbdtest.marker={marker}",
        discards as u8
    );
    let console_path = d.dir().join("console.log");
    let boot = Instant::now();
    let (status, qemu_pid, console) =
        run_guest(&qemu, &guest, &sock, &append, &console_path, &mut d);
    let guest_secs = boot.elapsed().as_secs_f64();
    println!(
        "---- guest console ({}) ----\n{}---- end of console ----",
        console_path.display(),
        console
    );

    // 1. The guest's verdict.
    if let Some(l) = console.lines().find(|l| l.contains("Kernel panic")) {
        panic!("the guest kernel panicked: {l}\n{}", banner(&d, &console));
    }
    if let Some(l) = console.lines().find(|l| l.contains("NBDTEST: FAIL")) {
        panic!("guest failed: {l}\n{}", banner(&d, &console));
    }
    assert!(
        console.lines().any(|l| l.contains("NBDTEST: ALL OK")),
        "guest did not print NBDTEST: ALL OK (qemu {status})\n{}",
        banner(&d, &console)
    );
    assert!(
        status.success(),
        "qemu exited {status} after ALL OK\n{}",
        banner(&d, &console)
    );

    // 2. The daemon saw the kernel attach and disconnect cleanly, and is still serving.
    wait_for_log(&d, "client disconnected", Duration::from_secs(10));
    let log = d.log();
    let attached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client attached"))
        .collect();
    let disconnected = log
        .lines()
        .filter(|l| l.contains("client disconnected"))
        .count();
    assert!(
        attached.len() == 1 && disconnected == 1,
        "expected one kernel session (attached + disconnected), got {} attached, {disconnected} disconnected\n{}",
        attached.len(),
        banner(&d, &console)
    );
    for want in [
        "encrypted=true".to_owned(),
        format!("export={EXPORT}"),
        format!("pid={qemu_pid}"),
    ] {
        assert!(
            attached[0].contains(&want),
            "attach line lacks {want}: {}\n{}",
            attached[0],
            banner(&d, &console)
        );
    }
    for bad in [
        "WARN",
        "ERROR",
        "protocol error",
        "abnormally",
        "handshake failed",
        "timed out",
        "request rejected",
    ] {
        assert!(
            !log.contains(bad),
            "daemon log contains {bad:?}\n{}",
            banner(&d, &console)
        );
    }
    let reqs = requests(&log);
    let count = |c: &str| reqs.iter().filter(|r| r.0 == c).count();
    assert_eq!(
        reqs.last().map(|r| r.0.as_str()),
        Some("Disc"),
        "the kernel's last request was not NBD_CMD_DISC"
    );
    assert!(
        count("Read") > 0 && count("Write") > 0,
        "no reads or writes logged\n{}",
        banner(&d, &console)
    );
    assert!(
        count("Flush") > 0,
        "the kernel never sent FLUSH (sync, umount, journal commits)\n{}",
        banner(&d, &console)
    );
    assert_eq!(
        count("Trim") > 0,
        discards,
        "TRIM requests: {} with discards={discards}",
        count("Trim")
    );
    let mut mix: Vec<String> = [
        "Read",
        "Write",
        "Flush",
        "Trim",
        "WriteZeroes",
        "Cache",
        "BlockStatus",
        "Disc",
    ]
    .iter()
    .filter(|c| count(c) > 0)
    .map(|c| {
        let max = reqs
            .iter()
            .filter(|r| r.0 == *c)
            .map(|r| r.1)
            .max()
            .unwrap_or(0);
        format!("{c}={} (max {} KiB)", count(c), max / 1024)
    })
    .collect();
    mix.push(format!(
        "FUA writes={}",
        reqs.iter()
            .filter(|r| r.0 == "Write" && r.2 & 1 != 0)
            .count()
    ));
    println!("requests from the kernel: {}", mix.join(", "));
    d.assert_alive();

    // 3. The volume file holds ciphertext only: neither the file contents nor the ext4 label.
    let on_disk = std::fs::read(&vol).unwrap();
    for needle in [marker.as_bytes(), FS_LABEL.as_bytes()] {
        assert!(
            find(&on_disk, needle).is_none(),
            "plaintext {:?} found in the volume file at offset {:?}: the kernel's writes were not encrypted",
            String::from_utf8_lossy(needle),
            find(&on_disk, needle)
        );
    }

    // 4. Read back through the daemon (the guest has detached): it decrypts to the guest's ext4.
    let plain = d.dir().join("export.img");
    run(tool("nbdcopy").arg(d.uri()).arg(&plain), TOOL_TIMEOUT).success();
    let data = std::fs::read(&plain).unwrap();
    assert_eq!(
        data.len() as u64,
        EXPORT_SIZE,
        "nbdcopy read {} bytes",
        data.len()
    );
    assert_eq!(
        &data[1080..1082],
        &[0x53, 0xEF],
        "no ext4 superblock magic 0xEF53 at offset 1080 of the decrypted export"
    );
    assert_eq!(
        &data[1024 + 0x78..1024 + 0x78 + FS_LABEL.len()],
        FS_LABEL.as_bytes(),
        "ext4 label"
    );
    assert!(
        find(&data, marker.as_bytes()).is_some(),
        "the decrypted export does not contain marker.txt's contents"
    );
    std::fs::remove_file(&plain).unwrap();
    d.assert_alive();

    let meta = std::fs::metadata(&vol).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    println!(
        "kernel client, discards={discards}: guest run {guest_secs:.1}s, whole test {:.1}s; \
         volume file {} MiB, {} MiB allocated",
        started.elapsed().as_secs_f64(),
        meta.len() / MIB,
        allocated / MIB
    );
    for l in console
        .lines()
        .filter(|l| l.contains("NBDTEST: queue:") || l.contains("fstrim"))
    {
        println!("{l}");
    }
}

// ---- the kernel client over TLS ----------------------------------------------------------------

/// The kernel's `nbd-client` over TLS with a client certificate (mutual TLS), against
/// `nbdcryptd --tls require --tls-verify-peer` on TCP:
///
/// ```text
/// host:  nbdcryptd --tcp 127.0.0.1:P ⇐ recording relay ⇐ qemu -chardev socket,host=…  port "nbd"
///                  --tls require     ⇐ qemu -chardev socket,host=127.0.0.1,port=P ── port "nbdplain"
/// guest: 127.0.0.1:10809 (socat ⇄ port "nbd")      ⇐ nbd-client -certfile -keyfile -cacertfile
///        127.0.0.1:10810 (socat ⇄ port "nbdplain") ⇐ nbd-client without TLS: must be refused
/// ```
///
/// The certificates are made per run with certtool (`common/pki.rs`); the client's go into the
/// guest as a second cpio archive appended to the initramfs. Checked from the host: the guest
/// run as in the plaintext test (mkfs, write, sync, remount, verify, fstrim, detach); the
/// plaintext attach was refused (ERR_TLS_REQD) and attached nothing; the one session was TLS 1.2
/// (nbd-client 3.24 speaks nothing else) with the client's certificate subject in the log and
/// the audit log; the recorded TCP stream is STARTTLS then TLS records and carries neither the
/// guest's marker text nor the ext4 label; the volume file holds ciphertext only; and an
/// `nbdcopy nbds://` read-back decrypts to the guest's file system.
#[test]
fn kernel_client_over_tls_with_a_client_certificate_and_plaintext_refused() {
    const CLIENT_CN: &str = "kernel-guest.example.test";
    let started = Instant::now();
    let qemu = require("qemu-system-x86_64", "qemu-system-x86");
    let cpio = require("cpio", "cpio");
    let guest = build_guest();

    let dir = tempdir();
    let (vol, key) = format_volume(dir.path());
    let pki = pki::generate(&dir.path().join("certs"), "nbdcrypt kvm test CA", CLIENT_CN);

    // The guest's /tls: CA, client certificate and key, as an extra newc archive. The kernel
    // unpacks concatenated archives in order, so these files land next to the base image's.
    let stage = dir.path().join("guest-tls");
    std::fs::create_dir_all(stage.join("tls")).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(pki.client().join(f), stage.join("tls").join(f)).unwrap();
    }
    let extra = dir.path().join("tls.cpio");
    let mut c = Command::new(&cpio)
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(File::create(&extra).unwrap())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"tls\ntls/ca-cert.pem\ntls/client-cert.pem\ntls/client-key.pem\n")
        .unwrap();
    assert!(c.wait().unwrap().success(), "cpio failed");
    let initramfs = dir.path().join("initramfs-tls.cpio");
    {
        let mut out = File::create(&initramfs).unwrap();
        std::io::copy(&mut File::open(&guest.initramfs).unwrap(), &mut out).unwrap();
        std::io::copy(&mut File::open(&extra).unwrap(), &mut out).unwrap();
    }
    std::fs::remove_dir_all(&stage).unwrap();

    let port = pki::free_port();
    let addr = format!("127.0.0.1:{port}");
    let audit = dir.path().join("audit.jsonl");
    let args: Vec<std::ffi::OsString> = vec![
        "--volume".into(),
        vol.clone().into(),
        "--unix".into(),
        dir.path().join("nbd.sock").into(),
        "--tcp".into(),
        addr.clone().into(),
        "--tls".into(),
        "require".into(),
        "--tls-certificates".into(),
        pki.server().into(),
        "--tls-verify-peer".into(),
        "--audit-log".into(),
        audit.clone().into(),
        "--control".into(),
        dir.path().join("control.sock").into(),
        "--unlock-key-file".into(),
        key.into(),
        "--handshake-timeout".into(),
        "300".into(),
        "--allow-discards".into(),
        "--log-level".into(),
        "info,nbdcrypt::nbd::session=debug".into(),
    ];
    let mut d = Daemon::start_in(dir, args);
    wait_for_log(&d, "unlocked with the key file", Duration::from_secs(30));
    pki::wait_tcp(&addr);

    // qemu's TLS-side connection goes through a relay that records both directions.
    let relay = Relay::start(&addr);
    let marker = format!(
        "nbdcrypt-kvm-tls-plaintext-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let append = format!(
        "console=ttyS0 panic=-1 loglevel=4 no_timer_check nbdtest.export={EXPORT} nbdtest.size={EXPORT_SIZE} \
         nbdtest.discard=1 nbdtest.marker={marker} nbdtest.tls=1"
    );
    let ports = [
        ("nbd", format!("socket,host=127.0.0.1,port={}", relay.port)),
        ("nbdplain", format!("socket,host=127.0.0.1,port={port}")),
    ];
    let console_path = d.dir().join("console.log");
    let boot = Instant::now();
    let (status, _qemu_pid, console) = run_guest_with(
        &qemu,
        &guest,
        &initramfs,
        &ports,
        &append,
        &console_path,
        &mut d,
    );
    let guest_secs = boot.elapsed().as_secs_f64();
    std::fs::remove_file(&initramfs).unwrap();
    println!(
        "---- guest console ({}) ----\n{}---- end of console ----",
        console_path.display(),
        console
    );

    // 1. The guest's verdict, including the refused plaintext attach.
    if let Some(l) = console.lines().find(|l| l.contains("Kernel panic")) {
        panic!("the guest kernel panicked: {l}\n{}", banner(&d, &console));
    }
    if let Some(l) = console.lines().find(|l| l.contains("NBDTEST: FAIL")) {
        panic!("guest failed: {l}\n{}", banner(&d, &console));
    }
    for want in [
        // nbd-client prints the message of our NBD_REP_ERR_TLS_REQD reply to its OPT_GO
        "TLS is required on this listener",
        "NBDTEST: plaintext attach refused: OK",
        "NBDTEST: ALL OK",
    ] {
        assert!(
            console.lines().any(|l| l.contains(want)),
            "guest did not print {want:?} (qemu {status})\n{}",
            banner(&d, &console)
        );
    }
    assert!(
        status.success(),
        "qemu exited {status} after ALL OK\n{}",
        banner(&d, &console)
    );

    // 2. The daemon: the plaintext client got ERR_TLS_REQD and attached nothing; the one session
    //    is TLS 1.2 with the client's certificate subject, in the log and in the audit log.
    wait_for_log(&d, "client disconnected", Duration::from_secs(10));
    let log = d.log();
    let attached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("client attached"))
        .collect();
    assert_eq!(
        attached.len(),
        1,
        "expected one kernel session (the TLS one)\n{}",
        banner(&d, &console)
    );
    let tls_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("TLS client attaching"))
        .collect();
    assert_eq!(tls_lines.len(), 1, "{}", banner(&d, &console));
    let subject = format!("O=nbdcrypt test,CN={CLIENT_CN}");
    for want in [subject.as_str(), "TLSv1_2", &format!("export={EXPORT}")] {
        assert!(
            tls_lines[0].contains(want),
            "TLS attach line lacks {want:?}: {}",
            tls_lines[0]
        );
    }
    let audit_text = std::fs::read_to_string(&audit).unwrap_or_default();
    let ev: Vec<&str> = audit_text
        .lines()
        .filter(|l| l.contains("nbd_tls_attach"))
        .collect();
    assert_eq!(ev.len(), 1, "nbd_tls_attach events:\n{audit_text}");
    assert!(
        ev[0].contains(&subject) && ev[0].contains("client_sha256"),
        "audit event lacks the client's subject or fingerprint: {}",
        ev[0]
    );
    for bad in [
        "ERROR",
        "protocol error",
        "abnormally",
        "timed out",
        "TLS handshake failed",
    ] {
        assert!(
            !log.contains(bad),
            "daemon log contains {bad:?}\n{}",
            banner(&d, &console)
        );
    }
    let reqs = requests(&log);
    let count = |c: &str| reqs.iter().filter(|r| r.0 == c).count();
    assert_eq!(reqs.last().map(|r| r.0.as_str()), Some("Disc"));
    assert!(
        count("Read") > 0 && count("Write") > 0 && count("Flush") > 0 && count("Trim") > 0,
        "reads, writes, flushes and trims expected: {reqs:?}"
    );
    d.assert_alive();

    // 3. On the wire: STARTTLS, then TLS records only; no plaintext in either direction.
    let (up, down) = relay.finish();
    let starttls = {
        let mut b = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec(); // IHAVEOPT
        b.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
        b.extend_from_slice(&0u32.to_be_bytes());
        b
    };
    assert_eq!(
        up.get(4..20),
        Some(&starttls[..]),
        "nbd-client's first option was not STARTTLS: {}",
        hex(&up[..up.len().min(40)])
    );
    assert_eq!(
        up.get(20..22),
        Some(&[0x16, 0x03][..]),
        "no TLS handshake record after STARTTLS"
    );
    println!(
        "wire: {} MiB guest to daemon, {} MiB back, over TLS",
        up.len() as u64 / MIB,
        down.len() as u64 / MIB
    );
    assert!(
        up.len() as u64 > 4 * MIB,
        "only {} bytes went up: the guest's writes did not pass the relay",
        up.len()
    );
    for (what, bytes) in [("guest to daemon", &up), ("daemon to guest", &down)] {
        for needle in [marker.as_bytes(), FS_LABEL.as_bytes(), b"lost+found"] {
            assert!(
                find(bytes, needle).is_none(),
                "plaintext {:?} on the wire ({what}) at offset {:?}",
                String::from_utf8_lossy(needle),
                find(bytes, needle)
            );
        }
    }
    drop((up, down));

    // 4. The volume file holds ciphertext only.
    let on_disk = std::fs::read(&vol).unwrap();
    for needle in [marker.as_bytes(), FS_LABEL.as_bytes()] {
        assert!(
            find(&on_disk, needle).is_none(),
            "plaintext {:?} found in the volume file",
            String::from_utf8_lossy(needle)
        );
    }
    drop(on_disk);

    // 5. Read back over TLS with the same client certificate: the guest's ext4 and marker.
    let plain = d.dir().join("export.img");
    let uri = format!(
        "nbds://{addr}/{EXPORT}?tls-certificates={}",
        pki.client().display()
    );
    run(tool("nbdcopy").arg(&uri).arg(&plain), TOOL_TIMEOUT).success();
    let data = std::fs::read(&plain).unwrap();
    std::fs::remove_file(&plain).unwrap();
    assert_eq!(data.len() as u64, EXPORT_SIZE);
    assert_eq!(&data[1080..1082], &[0x53, 0xEF], "no ext4 superblock magic");
    assert!(
        find(&data, marker.as_bytes()).is_some(),
        "the decrypted export does not contain marker.txt's contents"
    );
    d.assert_alive();
    println!(
        "kernel client over TLS: guest run {guest_secs:.1}s, whole test {:.1}s; {}",
        started.elapsed().as_secs_f64(),
        tls_lines[0]
    );
}

/// A one-connection TCP relay that records both directions (guest to daemon, daemon to guest).
struct Relay {
    port: u16,
    thread: std::thread::JoinHandle<(Vec<u8>, Vec<u8>)>,
}

impl Relay {
    fn start(target: &str) -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let target = target.to_owned();
        let thread = std::thread::spawn(move || {
            let (a, _) = l.accept().unwrap();
            let b = std::net::TcpStream::connect(&target).unwrap();
            let pump = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    seen
                })
            };
            let up = pump(a.try_clone().unwrap(), b.try_clone().unwrap());
            let down = pump(b, a);
            (up.join().unwrap(), down.join().unwrap())
        });
        Relay { port, thread }
    }

    /// Both directions' bytes, once the connection has ended.
    fn finish(self) -> (Vec<u8>, Vec<u8>) {
        self.thread.join().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------

/// A fresh LUKS2 volume made by `nbdcryptctl format` in `dir`, and its random key file.
fn format_volume(dir: &Path) -> (PathBuf, PathBuf) {
    let vol = dir.join("volume.img");
    let key = dir.join("volume.key");
    let mut raw_key = [0u8; 32];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut raw_key)
        .unwrap();
    std::fs::write(&key, hex(&raw_key)).unwrap();
    let ctl = daemon_binary().with_file_name("nbdcryptctl");
    assert!(
        ctl.is_file(),
        "{} not found: run `cargo build --workspace --bins`",
        ctl.display()
    );
    run(
        Command::new(&ctl)
            .arg("format")
            .arg(&vol)
            .args(["--size", VOLUME_FILE_SIZE, "--key-file"])
            .arg(&key)
            .args([
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--yes",
            ]),
        TOOL_TIMEOUT,
    )
    .success();
    (vol, key)
}

struct Guest {
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

/// `target/` of this build: the test executable is `target/debug/deps/kernel_client-…`.
fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.parent()?.to_owned()))
        .filter(|t| t.join("debug").is_dir() || t.join("release").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Run `tests/kernel-vm/build-guest.sh` (cheap when its outputs are up to date; it takes a lock,
/// so both tests may call it at once).
fn build_guest() -> Guest {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-vm/build-guest.sh");
    let out_dir = target_dir().join("kernel-vm");
    let out = run(
        Command::new("bash").arg(&script).arg(&out_dir),
        BUILD_TIMEOUT,
    );
    assert!(
        out.ok(),
        "{} failed ({}): cannot build the guest kernel + initramfs. Its message names the missing \
         prerequisite; ./scripts/test.sh installs them (and apt-get download needs network and \
         apt lists)\n{}",
        script.display(),
        out.status,
        out.details()
    );
    let get = |k: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build-guest.sh printed no {k}\n{}", out.details()))
    };
    let g = Guest {
        vmlinux: get("vmlinux="),
        initramfs: get("initramfs="),
    };
    assert!(
        g.vmlinux.is_file() && g.initramfs.is_file(),
        "build-guest.sh outputs missing"
    );
    g
}

/// Kills qemu if the test panics while it runs.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Boot the guest; returns qemu's exit status and the console, each line prefixed with the
/// seconds since qemu started. Fails the test on timeout or if the daemon dies meanwhile.
fn run_guest(
    qemu: &Path,
    g: &Guest,
    sock: &Path,
    append: &str,
    console_path: &Path,
    d: &mut Daemon,
) -> (std::process::ExitStatus, u32, String) {
    let ports = [("nbd", format!("socket,path={}", sock.display()))];
    run_guest_with(qemu, g, &g.initramfs, &ports, append, console_path, d)
}

/// [`run_guest`] with another initramfs and any virtio-serial ports: (port name, qemu
/// `-chardev` backend without its id, e.g. `socket,host=127.0.0.1,port=P`).
fn run_guest_with(
    qemu: &Path,
    g: &Guest,
    initramfs: &Path,
    ports: &[(&str, String)],
    append: &str,
    console_path: &Path,
    d: &mut Daemon,
) -> (std::process::ExitStatus, u32, String) {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-M",
        "pc",
        "-m",
        "256",
        "-smp",
        "1",
    ])
    .args([
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ])
    .args(["-device", "virtio-serial-pci"])
    .arg("-kernel")
    .arg(&g.vmlinux)
    .arg("-initrd")
    .arg(initramfs)
    .args(["-append", append]);
    for (i, (name, backend)) in ports.iter().enumerate() {
        cmd.args(["-chardev", &format!("{backend},id=port{i}")])
            .args([
                "-device",
                &format!("virtserialport,chardev=port{i},name={name}"),
            ]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = KillOnDrop(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", qemu.display())),
    );
    let console = Arc::new(Mutex::new(String::new()));
    let mut file = File::create(console_path).unwrap();
    let readers: Vec<_> = [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, r)| {
        let console = console.clone();
        let mut file = file.try_clone().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                let line = format!(
                    "{:7.2} {}{}\n",
                    start.elapsed().as_secs_f64(),
                    if i == 1 { "qemu: " } else { "" },
                    line.trim_end_matches('\r')
                );
                let _ = file.write_all(line.as_bytes());
                console.lock().unwrap().push_str(&line);
            }
        })
    })
    .collect();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > QEMU_TIMEOUT {
            let _ = child.0.kill();
            let _ = child.0.wait();
            let c = console.lock().unwrap().clone();
            panic!(
                "the guest did not power off within {QEMU_TIMEOUT:?}\n{}",
                banner(d, &c)
            );
        }
        d.assert_alive();
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    let _ = writeln!(
        file,
        "qemu exited {status} after {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let c = console.lock().unwrap().clone();
    (status, child.0.id(), c)
}

fn banner(d: &Daemon, console: &str) -> String {
    format!(
        "---- guest console ----\n{console}---- nbdcryptd stderr ----\n{}---- end ----",
        d.log()
    )
}

#[track_caller]
fn wait_for_log(d: &Daemon, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !d.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "nbdcryptd did not log {what:?} within {timeout:?}\n---- nbdcryptd stderr ----\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Path of an external program, or a test failure naming its Debian package.
fn require(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "required tool `{name}` is not installed (Debian package {package}); \
                 ./scripts/test.sh installs every tool the tests need"
            )
        })
}

/// (command, length, flags) of each request the daemon logged at debug level, in order.
fn requests(log: &str) -> Vec<(String, u64, u64)> {
    let field = |l: &str, k: &str| -> Option<String> {
        let i = l.find(&format!(" {k}="))? + k.len() + 2;
        Some(l[i..].split(' ').next()?.to_owned())
    };
    log.lines()
        .filter(|l| l.contains("nbd::session: request cookie="))
        .filter_map(|l| {
            let num = |k| field(l, k).and_then(|v| v.parse().ok()).unwrap_or(0);
            Some((field(l, "command")?, num("length"), num("flags")))
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (first, rest) = needle.split_first()?;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - rest.len()]
            .iter()
            .position(|b| b == first)
        {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &hay[at + 1..at + needle.len()] == rest {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
