//! `nbdcryptctl bench`: what AES-XTS costs on this machine, as `cryptsetup benchmark` does for
//! dm-crypt, and with `--volume` what it costs end to end through a real nbdcryptd.
//!
//! The cipher benchmark runs our own sector cipher (the code the daemon runs) on one core:
//! AES-128/256-XTS (256- and 512-bit keys) on 512- and 4096-byte sectors, with the
//! implementation the CPU selected and the portable one beside it. `--volume` formats a
//! temporary LUKS2 volume file, serves it with a temporary nbdcryptd, drives it with a small
//! built-in NBD client (sequential 1 MiB and random 4 KiB, pipelined), then does the same on
//! `--plain` in the same run and prints the ratio.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use nbdcrypt::crypto::keys::{SecretBytes, VolumeKey};
use nbdcrypt::crypto::xts::SectorCipher;

use crate::exit::Failure;
use crate::progress::Progress;

pub const BENCH_ABOUT: &str = "\
Measure AES-XTS on this machine, like `cryptsetup benchmark`: encryption and decryption speed
of nbdcrypt's own sector cipher on one core, for 256- and 512-bit keys (AES-128/256-XTS) and
512- and 4096-byte sectors, with the implementation this CPU selected (vaes512 on CPUs with
AVX-512 VAES, else portable) and the portable one for comparison.

--volume measures the whole path instead: a temporary LUKS2 volume file served by a temporary
nbdcryptd, read and written over NBD (sequential 1 MiB at queue depth 8, random 4 KiB at queue
depth 16), then the same on an unencrypted --plain daemon in the same run; the ratio is the
cost of encryption. Nothing outside the temporary directory is touched.";

pub const BENCH_EXAMPLES: &str = "\
Examples:
  nbdcryptctl bench
  nbdcryptctl bench --json | jq '.results[] | select(.key_bits == 512)'
  nbdcryptctl bench --volume --size 512M --seconds 5 --dir /var/tmp";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// End-to-end: a temporary daemon on a temporary volume file, against --plain.
    #[arg(long)]
    pub volume: bool,

    /// Seconds per measurement.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub seconds: f64,

    /// With --volume: size of the temporary volume's data.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = nbdcrypt::config::parse_size)]
    pub size: u64,

    /// With --volume: where the temporary directory goes (its filesystem is what is measured).
    #[arg(long, value_name = "DIR", default_value = "/tmp")]
    pub dir: PathBuf,

    /// With --volume: the nbdcryptd to run (default: the one beside nbdcryptctl, else $PATH).
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,

    /// Print the results as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: BenchArgs) -> Result<(), Failure> {
    let secs = a.seconds.clamp(0.05, 600.0);
    let report = if a.volume {
        volume_bench(&a, secs)?
    } else {
        cipher_bench(secs)?
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Bytes per second of `f` over a buffer of `len`, run for about `secs`.
fn rate(secs: f64, len: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults, key schedule in cache)
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f();
        n += 1;
    }
    let t = start.elapsed().as_secs_f64();
    n as f64 * len as f64 / t
}

fn cipher_bench(secs: f64) -> Result<Value, Failure> {
    const BUF: usize = 1 << 20;
    let mut buf = vec![0x5au8; BUF];
    let mut results = Vec::new();
    let mut selected = String::new();
    let cells: [(u16, usize); 4] = [(256, 512), (256, 4096), (512, 512), (512, 4096)];
    let mut progress = Progress::steps("bench", cells.len() as u64 * 2);
    for (bits, sector) in cells {
        // A fixed, non-secret key: its value does not change the speed. Halves differ, as XTS needs.
        let bytes: Vec<u8> = (1..=255u8).cycle().take(usize::from(bits / 8)).collect();
        let key = VolumeKey::from_secret(SecretBytes::from_slice(&bytes));
        let fast = SectorCipher::new(&key, sector)
            .map_err(|e| Failure::error(format!("cannot build the cipher: {e}")))?;
        let portable = SectorCipher::new_portable(&key, sector)
            .map_err(|e| Failure::error(format!("cannot build the cipher: {e}")))?;
        selected = fast.implementation().to_owned();
        let mut ciphers = vec![(fast.implementation(), &fast)];
        if fast.implementation() != portable.implementation() {
            ciphers.push((portable.implementation(), &portable));
        }
        if ciphers.len() == 1 {
            progress.add(1); // no second implementation to measure on this CPU
        }
        for (name, c) in ciphers {
            let enc = rate(secs, BUF, || {
                let _ = c.encrypt_in_place(&mut buf, 0);
            });
            let dec = rate(secs, BUF, || {
                let _ = c.decrypt_in_place(&mut buf, 0);
            });
            results.push(json!({
                "cipher": "aes-xts-plain64",
                "key_bits": bits,
                "sector_size": sector,
                "implementation": name,
                "selected": name == selected,
                "encrypt_gb_per_s": round(enc / 1e9),
                "decrypt_gb_per_s": round(dec / 1e9),
            }));
            progress.add(1);
        }
    }
    progress.finish();
    Ok(json!({
        "kind": "cipher",
        "cpu": cpu_model(),
        "selected_implementation": selected,
        "threads": 1,
        "seconds_per_measurement": secs,
        "results": results,
    }))
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn table(r: &Value) -> String {
    let mut o = format!("# CPU: {}\n", r["cpu"].as_str().unwrap_or("?"));
    if r["kind"] == "cipher" {
        o.push_str(&format!(
            "# One core, {} s per measurement; {} is what this CPU selected.\n",
            r["seconds_per_measurement"],
            r["selected_implementation"].as_str().unwrap_or("?")
        ));
        o.push_str(
            "#       Algorithm |  Key | Sector |  Encryption |  Decryption | Implementation\n",
        );
        for x in r["results"].as_array().into_iter().flatten() {
            o.push_str(&format!(
                "  aes-xts-plain64 | {:>3}b | {:>5}B | {:>6.2} GB/s | {:>6.2} GB/s | {}{}\n",
                x["key_bits"].as_u64().unwrap_or(0),
                x["sector_size"].as_u64().unwrap_or(0),
                x["encrypt_gb_per_s"].as_f64().unwrap_or(0.0),
                x["decrypt_gb_per_s"].as_f64().unwrap_or(0.0),
                x["implementation"].as_str().unwrap_or("?"),
                if x["selected"] == true {
                    " (selected)"
                } else {
                    ""
                }
            ));
        }
        return o;
    }
    o.push_str(&format!(
        "# nbdcryptd on a {} MiB file in {}, {} s per workload; plain = --plain (no encryption).\n",
        r["size_bytes"].as_u64().unwrap_or(0) >> 20,
        r["dir"].as_str().unwrap_or("?"),
        r["seconds_per_measurement"],
    ));
    o.push_str(&format!(
        "# {:<16} | {:<26} | {:<26} | encrypted/plain\n",
        "Workload", "encrypted", "plain"
    ));
    for x in r["results"].as_array().into_iter().flatten() {
        o.push_str(&format!(
            "  {:<16} | {:>8.1} MiB/s {:>6.0} IOPS | {:>8.1} MiB/s {:>6.0} IOPS | {:.2}\n",
            x["workload"].as_str().unwrap_or("?"),
            x["encrypted_mib_per_s"].as_f64().unwrap_or(0.0),
            x["encrypted_iops"].as_f64().unwrap_or(0.0),
            x["plain_mib_per_s"].as_f64().unwrap_or(0.0),
            x["plain_iops"].as_f64().unwrap_or(0.0),
            x["ratio"].as_f64().unwrap_or(0.0),
        ));
    }
    o
}

// ---- end to end -------------------------------------------------------------------------

struct TempDaemon {
    child: Child,
}

impl Drop for TempDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn daemon_path(a: &BenchArgs) -> PathBuf {
    if let Some(p) = &a.daemon {
        return p.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nbdcryptd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nbdcryptd"))
}

fn start(daemon: &Path, dir: &Path, args: &[&std::ffi::OsStr]) -> Result<TempDaemon, Failure> {
    let log = std::fs::File::create(dir.join("daemon.log"))
        .map_err(|e| Failure::error(format!("cannot create the daemon log: {e}")))?;
    let child = Command::new(daemon)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| Failure::error(format!("cannot start {}: {e}", daemon.display())))?;
    Ok(TempDaemon { child })
}

const MAGIC_OPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, pipelined requests.
struct Nbd {
    s: UnixStream,
    size: u64,
}

fn io_err(e: std::io::Error) -> Failure {
    Failure::error(format!("NBD: {e}"))
}

impl Nbd {
    fn connect(sock: &Path) -> Result<Nbd, Failure> {
        let mut s = UnixStream::connect(sock).map_err(io_err)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io_err)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).map_err(io_err)?;
        if &hello[..8] != b"NBDMAGIC" {
            return Err(Failure::error("NBD: not an NBD server"));
        }
        s.write_all(&3u32.to_be_bytes()).map_err(io_err)?; // FIXED_NEWSTYLE | NO_ZEROES
                                                           // The empty name selects the daemon's one export.
        let mut opt = Vec::new();
        opt.extend_from_slice(&MAGIC_OPT.to_be_bytes());
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&6u32.to_be_bytes()); // name length (4) + name (0) + info count (2)
        opt.extend_from_slice(&0u32.to_be_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).map_err(io_err)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(io_err)?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
            let mut data = vec![0u8; len.min(1 << 16) as usize];
            s.read_exact(&mut data).map_err(io_err)?;
            match kind {
                1 => break, // ACK
                3 if data.len() >= 12 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap_or([0; 8])));
                }
                3 => {}
                _ => {
                    return Err(Failure::error(format!(
                        "NBD: the server refused the export (reply {kind:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| Failure::error("NBD: no export size"))?;
        Ok(Nbd { s, size })
    }

    fn request(
        &mut self,
        cmd: u16,
        cookie: u64,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(), Failure> {
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQ_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&off.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&h).map_err(io_err)?;
        self.s.write_all(payload).map_err(io_err)
    }

    /// Read one simple reply; `data` is filled for a read.
    fn reply(&mut self, data: &mut [u8]) -> Result<(), Failure> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).map_err(io_err)?;
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if magic != REPLY_MAGIC || err != 0 {
            return Err(Failure::error(format!("NBD: request failed (error {err})")));
        }
        self.s.read_exact(data).map_err(io_err)
    }
}

struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    block: u32,
    depth: usize,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq-write 1M",
        write: true,
        random: false,
        block: 1 << 20,
        depth: 8,
    },
    Workload {
        name: "seq-read 1M",
        write: false,
        random: false,
        block: 1 << 20,
        depth: 8,
    },
    Workload {
        name: "rand-write 4K",
        write: true,
        random: true,
        block: 4096,
        depth: 16,
    },
    Workload {
        name: "rand-read 4K",
        write: false,
        random: true,
        block: 4096,
        depth: 16,
    },
];

/// Operations completed in `secs`, pipelined at the workload's depth.
fn drive(nbd: &mut Nbd, w: &Workload, secs: f64) -> Result<u64, Failure> {
    let blocks = nbd.size / u64::from(w.block);
    if blocks == 0 {
        return Err(Failure::error("the volume is smaller than one block"));
    }
    let payload = vec![0xa5u8; w.block as usize];
    let mut sink = vec![0u8; if w.write { 0 } else { w.block as usize }];
    let mut next = 0u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut offset = || {
        let b = if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            next = (next + 1) % blocks;
            next
        };
        b * u64::from(w.block)
    };
    let (cmd, body): (u16, &[u8]) = if w.write { (1, &payload) } else { (0, &[]) };
    for i in 0..w.depth {
        nbd.request(cmd, i as u64, offset(), w.block, body)?;
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        nbd.reply(&mut sink)?;
        done += 1;
        nbd.request(cmd, done, offset(), w.block, body)?;
    }
    for _ in 0..w.depth {
        nbd.reply(&mut sink)?;
    }
    // FLUSH, so a write workload's numbers include getting its data to the file.
    nbd.request(3, u64::MAX, 0, 0, &[])?;
    nbd.reply(&mut [])?;
    Ok(done)
}

fn wait_socket(sock: &Path, d: &mut TempDaemon, dir: &Path) -> Result<Nbd, Failure> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(n) = Nbd::connect(sock) {
            return Ok(n);
        }
        if let Ok(Some(st)) = d.child.try_wait() {
            let log = std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default();
            return Err(Failure::error(format!("nbdcryptd exited ({st}):\n{log}")));
        }
        if Instant::now() > deadline {
            return Err(Failure::error("nbdcryptd did not serve within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_all(nbd: &mut Nbd, secs: f64, p: &mut Progress) -> Result<Vec<f64>, Failure> {
    let mut ops = Vec::new();
    for w in &WORKLOADS {
        let n = drive(nbd, w, secs)?;
        ops.push(n as f64 / secs);
        p.add(1);
    }
    Ok(ops)
}

fn volume_bench(a: &BenchArgs, secs: f64) -> Result<Value, Failure> {
    use nbdcrypt::luks2::{format, FormatParams, HashAlg, KdfParams};
    let daemon = daemon_path(a);
    let tmp = tempdir_in(&a.dir)?;
    let dir = tmp.path();
    let size = a.size.max(16 << 20) / 4096 * 4096;
    let mut p = Progress::steps("bench --volume", 2 * WORKLOADS.len() as u64);

    // The encrypted volume: a throwaway key (random, never leaves the directory).
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| Failure::error(format!("cannot read /dev/urandom: {e}")))?;
    let key_hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let key_file = dir.join("bench.key");
    write_private(&key_file, key_hex.as_bytes())?;
    let img = dir.join("volume.img");
    let mut params = FormatParams::new(KdfParams::Pbkdf2 {
        hash: HashAlg::Sha256,
        iterations: 1000,
    });
    params.digest_iterations = 1000;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img)
        .map_err(|e| Failure::error(format!("cannot create {}: {e}", img.display())))?;
    file.set_len(params.data_offset + size)
        .map_err(|e| Failure::error(format!("cannot size {}: {e}", img.display())))?;
    format(&file, &params, &SecretBytes::from_slice(key_hex.as_bytes()))
        .map_err(|e| Failure::error(format!("cannot format the benchmark volume: {e}")))?;
    drop(file);

    let os = |s: &str| std::ffi::OsString::from(s);
    let enc_sock = dir.join("enc.sock");
    let args = [
        os("--volume"),
        img.clone().into(),
        os("--unlock-key-file"),
        key_file.clone().into(),
        os("--unix"),
        enc_sock.clone().into(),
        os("--control"),
        dir.join("enc.control").into(),
    ];
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
    let mut d = start(&daemon, dir, &argv)?;
    let mut nbd = wait_socket(&enc_sock, &mut d, dir)?;
    let enc = run_all(&mut nbd, secs, &mut p)?;
    drop(nbd);
    drop(d);

    let plain = dir.join("plain.img");
    let plain_sock = dir.join("plain.sock");
    let args = [
        os("--plain"),
        plain.into(),
        os("--create"),
        os(&size.to_string()),
        os("--unix"),
        plain_sock.clone().into(),
        os("--control"),
        dir.join("plain.control").into(),
    ];
    let argv: Vec<&std::ffi::OsStr> = args.iter().map(|s| s.as_os_str()).collect();
    let mut d = start(&daemon, dir, &argv)?;
    let mut nbd = wait_socket(&plain_sock, &mut d, dir)?;
    let pl = run_all(&mut nbd, secs, &mut p)?;
    drop(nbd);
    drop(d);
    p.finish();

    let results: Vec<Value> = WORKLOADS
        .iter()
        .zip(enc.iter().zip(&pl))
        .map(|(w, (e, p))| {
            let mib = |iops: f64| round(iops * f64::from(w.block) / 1048576.0);
            json!({
                "workload": w.name,
                "block_size": w.block,
                "queue_depth": w.depth,
                "encrypted_iops": round(*e),
                "encrypted_mib_per_s": mib(*e),
                "plain_iops": round(*p),
                "plain_mib_per_s": mib(*p),
                "ratio": if *p > 0.0 { round(e / p) } else { 0.0 },
            })
        })
        .collect();
    Ok(json!({
        "kind": "volume",
        "cpu": cpu_model(),
        "daemon": daemon.display().to_string(),
        "dir": a.dir.display().to_string(),
        "size_bytes": size,
        "seconds_per_measurement": secs,
        "results": results,
    }))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| Failure::error(format!("cannot write {}: {e}", path.display())))
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir_in(parent: &Path) -> Result<TempDir, Failure> {
    use std::os::unix::fs::DirBuilderExt;
    for i in 0..100u32 {
        let p = parent.join(format!("nbdcrypt-bench.{}.{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(TempDir(p)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Failure::error(format!(
                    "cannot create a directory in {}: {e}",
                    parent.display()
                )))
            }
        }
    }
    Err(Failure::error("cannot create a temporary directory"))
}
