//! `dump`: the LUKS2 header in the spirit of `cryptsetup luksDump`, as text or JSON. Never shows
//! token contents (they may hold wrapped keys) or anything else secret, except the volume key
//! with `--dump-volume-key` after a passphrase and an explicit confirmation.

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use serde_json::{json, Value};

use nbdcrypt::luks2::{KdfParams, KeyslotInfo, KeyslotPriority, Luks2Header, SegmentSize};

use super::{confirmed, printable as esc, Volume};
use crate::secret_input::{io_reason, read_existing, Source};

pub const ABOUT: &str = "\
Show the LUKS2 header of a volume (or of a detached header file or header backup): version,
UUID, label, epoch, the data segment, keyslots with their KDF cost, and tokens with the keyslots
they serve. Token contents are never shown.

--dump-volume-key prints the volume key in hex after asking for a passphrase and a typed YES:
anyone with that key can decrypt the volume, whatever passphrases it has later.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl dump /srv/vol.img
  nbdcryptctl dump vol.img --json | jq '.keyslots[].id'
  nbdcryptctl dump vol.img --dump-volume-key --key-file key.bin --yes";

#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Volume file, block device, detached header, header backup, or NBD URI.
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// Machine-readable JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Print the volume key in hex (needs a passphrase and confirmation). DANGEROUS.
    #[arg(long)]
    pub dump_volume_key: bool,
    /// With --dump-volume-key: passphrase from this file (bytes as-is; `-` = standard input).
    #[arg(long, value_name = "FILE", requires = "dump_volume_key")]
    pub key_file: Option<PathBuf>,
    /// With --dump-volume-key: do not ask for confirmation.
    #[arg(long, requires = "dump_volume_key")]
    pub yes: bool,
    #[command(flatten)]
    pub kdf_limits: super::keys::KdfLimitArgs,
}

pub fn run(a: DumpArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, false)?;
    if a.dump_volume_key {
        return dump_volume_key(&vol, &a);
    }
    let hdr = vol.header_metadata_only()?;
    let mut out = io::stdout().lock();
    if a.json {
        let v = to_json(&hdr);
        serde_json::to_writer_pretty(&mut out, &v)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
            .map_err(stdout_error)?;
    } else {
        write_text(&mut out, &vol, &hdr).map_err(stdout_error)?;
    }
    Ok(())
}

fn stdout_error(e: io::Error) -> anyhow::Error {
    anyhow!("cannot write to standard output: {}", io_reason(&e))
}

fn priority_name(p: KeyslotPriority) -> &'static str {
    match p {
        KeyslotPriority::Ignore => "ignore",
        KeyslotPriority::Normal => "normal",
        KeyslotPriority::Prefer => "prefer",
    }
}

fn kdf_json(k: &Option<KdfParams>) -> Value {
    match *k {
        None => Value::Null,
        Some(KdfParams::Pbkdf2 { hash, iterations }) => {
            json!({"type": "pbkdf2", "hash": hash.name(), "iterations": iterations})
        }
        Some(
            p @ (KdfParams::Argon2i {
                time,
                memory_kib,
                cpus,
            }
            | KdfParams::Argon2id {
                time,
                memory_kib,
                cpus,
            }),
        ) => json!({"type": p.type_name(), "time": time, "memory_kib": memory_kib, "cpus": cpus}),
    }
}

fn keyslot_json(k: &KeyslotInfo) -> Value {
    json!({
        "id": k.id,
        "type": k.type_name,
        "priority": priority_name(k.priority),
        "key_bits": k.key_size.map(|s| s * 8),
        "kdf": kdf_json(&k.kdf),
        "area_offset": k.area_offset,
        "area_size": k.area_size,
        "opens_data": k.for_data,
    })
}

/// The dump as JSON: our own stable shape, not the raw header.
pub fn to_json(hdr: &Luks2Header) -> Value {
    let seg = hdr.data_segment();
    let tokens: Vec<Value> = hdr
        .tokens()
        .map(|(id, t)| {
            let mut j = json!({"id": id, "type": t.type_name(), "keyslots": t.keyslots()});
            // Our tokens: the provider and key reference (never the sealed blob).
            if let Ok(Some(p)) = nbdcrypt::luks2::tokens::format::parse(t) {
                j["provider"] = json!(p.kind.name());
                j["key"] = json!(p.key_reference());
            }
            j
        })
        .collect();
    json!({
        "version": 2,
        "uuid": hdr.uuid(),
        "label": hdr.label(),
        "subsystem": hdr.subsystem(),
        "epoch": hdr.seqid(),
        "metadata_area": hdr.hdr_size(),
        "keyslots_area": hdr.metadata_end() - 2 * hdr.hdr_size(),
        "flags": hdr.config_flags(),
        "segment": {
            "id": 0,
            "type": "crypt",
            "offset": seg.offset,
            "size": match seg.size {
                SegmentSize::Dynamic => json!("dynamic"),
                SegmentSize::Bytes(n) => json!(n),
            },
            "cipher": "aes-xts-plain64",
            "sector_size": seg.sector_size,
            "key_bits": seg.key_size.map(|s| s * 8),
            "iv_tweak": seg.iv_tweak,
        },
        "keyslots": hdr.keyslots().iter().map(keyslot_json).collect::<Vec<_>>(),
        "tokens": tokens,
        "volume_key_created": nbdcrypt::luks2::reencrypt::KeyAge::of(hdr)
            .map(|k| nbdcrypt::audit::rfc3339(k.created_unix)),
    })
}

/// The human dump. Every string that comes from the header (which whoever holds the disk can
/// write) goes through `esc`: terminal escapes, newlines and other control characters are shown
/// as `\e`, `\n`, `\u{..}`, so a crafted label cannot rewrite the screen or fake extra lines.
fn write_text(out: &mut dyn Write, vol: &Volume, hdr: &Luks2Header) -> io::Result<()> {
    write_text_for(out, &vol.path.to_string_lossy(), hdr)
}

/// The text dump of `hdr`, naming the volume `name` (a path or an upstream URI).
pub(super) fn write_text_for(out: &mut dyn Write, name: &str, hdr: &Luks2Header) -> io::Result<()> {
    let or = |s: &str, none: &str| {
        if s.is_empty() {
            none.to_owned()
        } else {
            esc(s)
        }
    };
    let flags = hdr.config_flags();
    writeln!(out, "LUKS header information for {}", esc(name))?;
    writeln!(out)?;
    writeln!(out, "Version:       \t2")?;
    writeln!(out, "Epoch:         \t{}", hdr.seqid())?;
    writeln!(out, "Metadata area: \t{} [bytes]", hdr.hdr_size())?;
    writeln!(
        out,
        "Keyslots area: \t{} [bytes]",
        hdr.metadata_end() - 2 * hdr.hdr_size()
    )?;
    writeln!(out, "UUID:          \t{}", esc(hdr.uuid()))?;
    writeln!(out, "Label:         \t{}", or(hdr.label(), "(no label)"))?;
    writeln!(
        out,
        "Subsystem:     \t{}",
        or(hdr.subsystem(), "(no subsystem)")
    )?;
    writeln!(
        out,
        "Flags:         \t{}",
        if flags.is_empty() {
            "(no flags)".to_owned()
        } else {
            esc(&flags.join(" "))
        }
    )?;
    writeln!(out)?;
    let seg = hdr.data_segment();
    writeln!(out, "Data segments:")?;
    writeln!(out, "  0: crypt")?;
    writeln!(out, "\toffset: {} [bytes]", seg.offset)?;
    match seg.size {
        SegmentSize::Dynamic => writeln!(out, "\tlength: (whole device)")?,
        SegmentSize::Bytes(n) => writeln!(out, "\tlength: {n} [bytes]")?,
    }
    writeln!(out, "\tcipher: aes-xts-plain64")?;
    writeln!(out, "\tsector: {} [bytes]", seg.sector_size)?;
    if let Some(age) = nbdcrypt::luks2::reencrypt::KeyAge::of(hdr) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        writeln!(
            out,
            "\tvolume key created: {} ({} days ago)",
            nbdcrypt::audit::rfc3339(age.created_unix),
            now.saturating_sub(age.created_unix) / 86400
        )?;
    }
    writeln!(out)?;
    writeln!(out, "Keyslots:")?;
    for k in hdr.keyslots() {
        writeln!(out, "  {}: {}", k.id, esc(&k.type_name))?;
        if let Some(bits) = k.key_size.map(|s| s * 8) {
            writeln!(out, "\tKey:        {bits} bits")?;
        }
        writeln!(out, "\tPriority:   {}", priority_name(k.priority))?;
        match k.kdf {
            Some(KdfParams::Pbkdf2 { hash, iterations }) => {
                writeln!(out, "\tPBKDF:      pbkdf2")?;
                writeln!(out, "\tHash:       {hash}")?;
                writeln!(out, "\tIterations: {iterations}")?;
            }
            Some(
                p @ (KdfParams::Argon2i {
                    time,
                    memory_kib,
                    cpus,
                }
                | KdfParams::Argon2id {
                    time,
                    memory_kib,
                    cpus,
                }),
            ) => {
                writeln!(out, "\tPBKDF:      {}", p.type_name())?;
                writeln!(out, "\tTime cost:  {time}")?;
                writeln!(out, "\tMemory:     {memory_kib}")?;
                writeln!(out, "\tThreads:    {cpus}")?;
            }
            None if k.type_name != "luks2" => writeln!(
                out,
                "\tType:       not implemented by nbdcrypt: kept as is, never tried, wiped or \
                 rewritten"
            )?,
            None => writeln!(
                out,
                "\tPBKDF:      (unsupported; this keyslot is never tried)"
            )?,
        }
        if let (Some(o), Some(s)) = (k.area_offset, k.area_size) {
            writeln!(out, "\tArea offset:{o} [bytes]")?;
            writeln!(out, "\tArea length:{s} [bytes]")?;
        }
        if !k.for_data {
            writeln!(
                out,
                "\tDigest:     (not bound to the data segment; never opens it)"
            )?;
        }
    }
    writeln!(out, "Tokens:")?;
    for (id, t) in hdr.tokens() {
        writeln!(out, "  {id}: {}", esc(t.type_name()))?;
        for s in t.keyslots() {
            writeln!(out, "\tKeyslot:    {s}")?;
        }
        if let Ok(Some(p)) = nbdcrypt::luks2::tokens::format::parse(t) {
            writeln!(out, "\tProvider:   {}", p.kind.name())?;
            if let Some(k) = p.key_reference() {
                writeln!(out, "\tKey:        {}", esc(k))?;
            }
        }
    }
    Ok(())
}

fn dump_volume_key(vol: &Volume, a: &DumpArgs) -> anyhow::Result<()> {
    let hdr = vol.header(false)?;
    let p = vol.path.display();
    eprintln!(
        "WARNING: the volume key of {p} will be printed in hex.\n\
         WARNING: anyone who sees it can decrypt the volume forever, even after every \
         passphrase is changed.\n\
         WARNING: do not paste it anywhere; clear your terminal scrollback afterwards."
    );
    let pass = read_existing(
        &Source::from_arg(a.key_file.as_deref()),
        &format!("Enter passphrase for {p}: "),
    )?;
    let (key, slot) = hdr
        .unlock(&vol.io, &pass, &a.kdf_limits.limits())
        .map_err(|e| vol.explain(e))?;
    drop(pass);
    confirmed(
        a.yes,
        &format!("Keyslot {slot} opened. Print the volume key of {p} on standard output?"),
    )?;
    let mut out = io::stdout().lock();
    let write = |out: &mut dyn Write| -> io::Result<()> {
        if a.json {
            write!(
                out,
                "{{\"uuid\": {}, \"keyslot\": {slot}, \"key_bits\": {}, \"volume_key\": \"",
                Value::from(hdr.uuid()),
                key.len() * 8
            )?;
        } else {
            writeln!(out, "LUKS header information for {}", esc(&p.to_string()))?;
            writeln!(out, "UUID:          \t{}", esc(hdr.uuid()))?;
            writeln!(out, "Cipher:        \taes-xts-plain64")?;
            writeln!(out, "Key bits:      \t{}", key.len() * 8)?;
            write!(out, "Volume key:    \t")?;
        }
        // Byte by byte: the key never lands in an ordinary String.
        for b in key.expose_secret() {
            write!(out, "{b:02x}")?;
        }
        if a.json {
            writeln!(out, "\"}}")?;
        } else {
            writeln!(out)?;
        }
        out.flush()
    };
    write(&mut out).map_err(stdout_error)?;
    Ok(())
}
