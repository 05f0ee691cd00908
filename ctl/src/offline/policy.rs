//! `nbdcryptctl policy VOLUME [--json]`: what opens the volume, in words, from its header.
//!
//! Every string shown comes from the header, which whoever holds the disk can write: each is
//! escaped (control characters, bidirectional overrides and zero-width characters as `\u{..}`)
//! and shortened, so a hostile token cannot rewrite the terminal or disguise one key as another.

use std::path::PathBuf;

use clap::Args;
use serde_json::{json, Value};

use nbdcrypt::luks2::tokens::format as token;
use nbdcrypt::luks2::tokens::quorum::{self, Holder};
use nbdcrypt::luks2::{KeyslotPriority, Luks2Header};

use super::Volume;

pub const ABOUT: &str = "\
Print the volume's unlock policy in words: for each keyslot, what opens it: a passphrase (or key
file), a KMS or HSM key (nbdcryptctl enroll), a quorum of K holders among KMS keys, HSM keys and
people (enroll --quorum), or another tool's token (systemd-cryptenroll, clevis). Any one keyslot
opens the volume. Reads the header only; needs no secret. Every string shown comes from the
header, which whoever holds the disk can write: they are escaped, and the KMS endpoints, keys
and HSM modules actually used are the operator's configuration, not these.";

pub const EXAMPLES: &str = "\
Examples:
  nbdcryptctl policy /srv/vol.img
  nbdcryptctl policy /srv/vol.img --json | jq '.keyslots[] | select(.kind == \"quorum\")'";

#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// Volume file, block device, or NBD URI (nbd+unix:///EXPORT?socket=PATH, nbds://HOST/EXPORT).
    #[arg(value_name = "VOLUME")]
    pub volume: PathBuf,
    /// One JSON object instead of words.
    #[arg(long)]
    pub json: bool,
}

/// Longest header string shown.
const MAX_SHOWN: usize = 200;

/// A header string made safe to print: control, bidi and zero-width characters escaped,
/// shortened to `MAX_SHOWN` characters.
pub fn escape(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX_SHOWN {
            out.push('…');
            break;
        }
        let hidden = c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{061c}');
        if hidden {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

struct Entry {
    words: String,
    json: Value,
}

fn slot_entries(hdr: &Luks2Header, slot: u32) -> Vec<Entry> {
    let mut out = Vec::new();
    for (id, t) in hdr.tokens() {
        if !t.keyslots().contains(&slot) {
            continue;
        }
        let ty = t.type_name();
        if ty == quorum::TOKEN_TYPE {
            match quorum::parse(t) {
                Ok(Some(q)) => {
                    let holders: Vec<String> =
                        q.shares.iter().map(|s| escape(&s.describe())).collect();
                    let hj: Vec<Value> = q
                        .shares
                        .iter()
                        .map(|s| match &s.holder {
                            Holder::Provider {
                                provider, params, ..
                            } => json!({"kind": provider, "key": s.name(), "words": s.describe(),
                                        "params": params}),
                            Holder::Passphrase { name, .. } => {
                                json!({"kind": "passphrase", "name": name, "words": s.describe()})
                            }
                        })
                        .collect();
                    out.push(Entry {
                        words: format!("{} of {{{}}}", q.threshold, holders.join(", ")),
                        json: json!({"token": id, "kind": "quorum", "threshold": q.threshold,
                                     "holders": hj}),
                    });
                }
                Ok(None) | Err(_) => {
                    let why = quorum::parse(t)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    out.push(Entry {
                        words: format!("quorum token {id}, unusable: {}", escape(&why)),
                        json: json!({"token": id, "kind": "quorum", "error": why}),
                    });
                }
            }
        } else if let Some(kind) = token::ProviderKind::from_token_type(ty) {
            match token::parse(t) {
                Ok(Some(p)) => {
                    let w = kind.provider().describe(&p.sealed.params);
                    out.push(Entry {
                        words: escape(&w),
                        json: json!({"token": id, "kind": kind.name(),
                                     "key": p.key_reference(), "words": w}),
                    });
                }
                Ok(None) | Err(_) => {
                    let why = token::parse(t)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    out.push(Entry {
                        words: format!("{} token {id}, unusable: {}", kind.name(), escape(&why)),
                        json: json!({"token": id, "kind": kind.name(), "error": why}),
                    });
                }
            }
        } else if ty == nbdcrypt::seal::clevis::TOKEN_TYPE {
            // clevis's own token (clevis luks bind, or enroll --tang/--tpm2/--sss).
            let e = match nbdcrypt::luks2::tokens::clevis::parse_token(id, t.json()) {
                Ok(Some(c)) => {
                    let w = nbdcrypt::seal::clevis::summary(&c.jwe);
                    Entry {
                        words: format!("clevis {}", escape(&w)),
                        json: json!({"token": id, "kind": "clevis", "words": w}),
                    }
                }
                Ok(None) | Err(_) => Entry {
                    words: format!("clevis token {id}, unusable"),
                    json: json!({"token": id, "kind": "clevis", "error": "unusable"}),
                },
            };
            out.push(e);
        } else {
            out.push(Entry {
                words: format!("a {} token (another tool's)", escape(ty)),
                json: json!({"token": id, "kind": "other", "type": ty}),
            });
        }
    }
    out
}

pub fn run(a: PolicyArgs) -> anyhow::Result<()> {
    let vol = Volume::open(&a.volume, false)?;
    let hdr = vol.header_metadata_only()?;
    let mut lines = Vec::new();
    let mut slots_json = Vec::new();
    for k in hdr.keyslots() {
        let entries = slot_entries(&hdr, k.id);
        let (words, kind) = if entries.is_empty() {
            ("a passphrase (or key file)".to_owned(), "passphrase")
        } else if entries.len() == 1 {
            (entries[0].words.clone(), "token")
        } else {
            (
                format!(
                    "any one of: {}",
                    entries
                        .iter()
                        .map(|e| e.words.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                "token",
            )
        };
        let kind = match entries.as_slice() {
            [e] => e.json["kind"].as_str().unwrap_or(kind).to_owned(),
            _ => kind.to_owned(),
        };
        let mut notes = Vec::new();
        if k.priority == KeyslotPriority::Ignore {
            notes.push("priority ignore: not tried unless named");
        }
        if !k.for_data {
            notes.push("does not open the data (no digest for it)");
        }
        let mut line = format!("keyslot {}: {words}", k.id);
        if !notes.is_empty() {
            line.push_str(&format!(" ({})", notes.join("; ")));
        }
        lines.push(line);
        slots_json.push(json!({"keyslot": k.id, "kind": kind, "words": words,
                               "tokens": entries.iter().map(|e| e.json.clone()).collect::<Vec<_>>(),
                               "priority": format!("{:?}", k.priority).to_lowercase(),
                               "opens_data": k.for_data}));
    }
    let orphans: Vec<(u32, String)> = hdr
        .tokens()
        .filter(|(_, t)| t.keyslots().is_empty())
        .map(|(id, t)| (id, t.type_name().to_owned()))
        .collect();
    if a.json {
        let j = json!({
            "volume_uuid": hdr.uuid(),
            "rule": "any one keyslot opens the volume",
            "keyslots": slots_json,
            "unbound_tokens": orphans.iter().map(|(id, ty)| json!({"token": id, "type": ty})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "volume {}: opens with any one of its keyslots",
        escape(hdr.uuid())
    );
    for l in &lines {
        println!("{l}");
    }
    for (id, ty) in orphans {
        println!(
            "token {id} ({}) is bound to no keyslot: it opens nothing",
            escape(&ty)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_rewrite_a_terminal_or_disguise_a_name() {
        assert_eq!(escape("alias/db"), "alias/db");
        assert_eq!(escape("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("x\ny"), "x\\u{a}y");
        assert_eq!(escape("evil\u{202e}gnp.exe"), "evil\\u{202e}gnp.exe");
        assert_eq!(escape("ze\u{200b}ro"), "ze\\u{200b}ro");
        assert_eq!(escape("prod/db ü"), "prod/db ü");
        assert_eq!(escape(&"a".repeat(500)).chars().count(), MAX_SHOWN + 1);
    }
}
