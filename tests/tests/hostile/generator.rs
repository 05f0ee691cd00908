//! Deterministic generator of hostile LUKS2 headers for the differential test
//! (`hostile_headers.rs`): from the JSON of a real cryptsetup-made header, a few hundred
//! mangled variants (areas shifted, overlapping, out of range or huge; wrong types; bad
//! references; missing members; duplicate ids), and the writer that puts a variant into both
//! header copies with valid checksums so the mangling reaches JSON validation.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One mangled header: a name that says what was done, and the JSON text for both copies.
pub struct Case {
    pub name: String,
    pub json: Vec<u8>,
}

type Edit = Box<dyn Fn(&mut Value)>;

fn set(path: &'static str, v: Value) -> Edit {
    Box::new(move |root: &mut Value| {
        let (parent, last) = walk(root, path);
        if let Some(o) = parent.as_object_mut() {
            o.insert(last.to_string(), v.clone());
        }
    })
}

fn remove(path: &'static str) -> Edit {
    Box::new(move |root: &mut Value| {
        let (parent, last) = walk(root, path);
        if let Some(o) = parent.as_object_mut() {
            o.remove(last);
        }
    })
}

fn edits(list: Vec<Edit>) -> Edit {
    Box::new(move |root: &mut Value| list.iter().for_each(|e| e(root)))
}

/// The parent object of `a.b.c` and the last key `c`; missing intermediate objects are created.
fn walk<'a>(root: &'a mut Value, path: &'static str) -> (&'a mut Value, &'static str) {
    let mut parts: Vec<&'static str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut cur = root;
    for p in parts {
        if !cur.get(p).is_some_and(Value::is_object) {
            if let Some(o) = cur.as_object_mut() {
                o.insert(p.to_string(), json!({}));
            }
        }
        cur = cur.get_mut(p).unwrap();
    }
    (cur, last)
}

/// Facts about the base header the generator aims at.
pub struct Base {
    pub hdr_size: u64,
    pub keyslots_size: u64,
    pub data_offset: u64,
    /// Offset and size of keyslot 0's and keyslot 1's areas.
    pub area0: (u64, u64),
    pub area1: (u64, u64),
}

impl Base {
    pub fn of(v: &Value) -> Base {
        let n = |x: &Value| x.as_str().unwrap().parse::<u64>().unwrap();
        let area = |k: &str| {
            let a = &v["keyslots"][k]["area"];
            (n(&a["offset"]), n(&a["size"]))
        };
        Base {
            hdr_size: n(&v["config"]["json_size"]) + 4096,
            keyslots_size: n(&v["config"]["keyslots_size"]),
            data_offset: n(&v["segments"]["0"]["offset"]),
            area0: area("0"),
            area1: area("1"),
        }
    }
}

fn s(n: u64) -> Value {
    Value::String(n.to_string())
}

/// Every variant for one base header, in a fixed order.
pub fn cases(base_json: &Value) -> Vec<Case> {
    let b = Base::of(base_json);
    let ks_start = 2 * b.hdr_size;
    let ks_end = ks_start + b.keyslots_size;
    let (o0, z0) = b.area0;
    let (o1, _) = b.area1;
    let mut list: Vec<(String, Edit)> = Vec::new();
    let mut add = |name: &str, e: Edit| list.push((name.to_string(), e));

    // ---- keyslot areas: offsets, sizes, overlaps ----
    for (name, off) in [
        ("zero", 0),
        ("in-primary-json", 4096),
        ("at-secondary-header", b.hdr_size),
        ("just-before-keyslots-area", ks_start - 4096),
        ("at-keyslots-area-end", ks_end),
        ("crossing-keyslots-area-end", ks_end - 4096),
        ("at-data-offset", b.data_offset),
        ("beyond-device", 1 << 40),
        ("u64-max", u64::MAX),
        ("unaligned-1", o0 + 1),
        ("unaligned-512", o0 + 512),
        ("overlapping-slot1", o1),
        ("overlapping-slot1-tail", o1 + 4096),
        ("free-space-aligned", ks_end - z0 - 8192),
    ] {
        add(
            &format!("ks0.area.offset={name}"),
            set("keyslots.0.area.offset", s(off)),
        );
    }
    for (name, size) in [
        ("zero", 0),
        ("one", 1),
        ("511", 511),
        ("smaller-than-material", 4096),
        ("material-exact-256000", 256_000),
        ("into-slot1", o1 - o0 + 4096),
        ("to-keyslots-end", ks_end - o0),
        ("past-keyslots-end", ks_end - o0 + 4096),
        ("1GiB-over-data", 1 << 30),
        ("u64-max", u64::MAX),
    ] {
        add(
            &format!("ks0.area.size={name}"),
            set("keyslots.0.area.size", s(size)),
        );
    }
    add(
        "ks1.area=copy-of-ks0",
        edits(vec![
            set("keyslots.1.area.offset", s(o0)),
            set("keyslots.1.area.size", s(z0)),
        ]),
    );
    for (field, n) in [("offset", o0), ("size", z0)] {
        for (name, v) in [
            ("number", json!(n)),
            ("negative", json!(format!("-{n}"))),
            ("empty", json!("")),
            ("leading-zero", json!(format!("0{n}"))),
            ("plus", json!(format!("+{n}"))),
            ("hex", json!(format!("{n:#x}"))),
            ("space", json!(format!(" {n}"))),
            ("overflow-2^64", json!("18446744073709551616")),
            ("null", Value::Null),
        ] {
            add(
                &format!("ks0.area.{field}:{name}"),
                set(leak(format!("keyslots.0.area.{field}")), v),
            );
        }
    }
    for m in ["offset", "size", "type", "encryption", "key_size"] {
        add(
            &format!("ks0.area-missing-{m}"),
            remove(leak(format!("keyslots.0.area.{m}"))),
        );
    }
    add(
        "ks0.area.type=foo",
        set("keyslots.0.area.type", json!("foo")),
    );
    add(
        "ks0.area.encryption=aes-cbc",
        set("keyslots.0.area.encryption", json!("aes-cbc-essiv:sha256")),
    );
    add(
        "ks0.area.encryption=empty",
        set("keyslots.0.area.encryption", json!("")),
    );
    for k in [0, 16, 48, 128, -1] {
        add(
            &format!("ks0.area.key_size={k}"),
            set("keyslots.0.area.key_size", json!(k)),
        );
    }
    add(
        "ks0.area.key_size:string",
        set("keyslots.0.area.key_size", json!("64")),
    );

    // ---- keyslot: key_size, af, kdf, priority, type ----
    for k in [
        json!(0),
        json!(32),
        json!(63),
        json!(513),
        json!(-1),
        json!(4294967296u64),
        json!("64"),
    ] {
        add(&format!("ks0.key_size={k}"), set("keyslots.0.key_size", k));
    }
    add("ks0.key_size-missing", remove("keyslots.0.key_size"));
    for st in [
        json!(0),
        json!(1),
        json!(3999),
        json!(4001),
        json!(-1),
        json!("4000"),
    ] {
        add(
            &format!("ks0.af.stripes={st}"),
            set("keyslots.0.af.stripes", st),
        );
    }
    for h in ["sha1", "sha512", "whirlpool", ""] {
        add(
            &format!("ks0.af.hash={h}"),
            set("keyslots.0.af.hash", json!(h)),
        );
    }
    add(
        "ks0.af.type=luks2",
        set("keyslots.0.af.type", json!("luks2")),
    );
    add("ks0.af-missing", remove("keyslots.0.af"));
    add("ks0.af.hash-missing", remove("keyslots.0.af.hash"));
    add("ks0.kdf-missing", remove("keyslots.0.kdf"));
    add(
        "ks0.kdf.type=scrypt",
        set("keyslots.0.kdf.type", json!("scrypt")),
    );
    add(
        "ks0.kdf.salt-short",
        set("keyslots.0.kdf.salt", json!("AAAA")),
    );
    add(
        "ks0.kdf.salt-not-base64",
        set("keyslots.0.kdf.salt", json!("!!!!")),
    );
    add("ks0.kdf.salt-missing", remove("keyslots.0.kdf.salt"));
    add(
        "ks0.kdf.extra-member",
        set("keyslots.0.kdf.bogus", json!(1)),
    );
    add("ks0.priority=0", set("keyslots.0.priority", json!(0)));
    add("ks0.priority=2", set("keyslots.0.priority", json!(2)));
    add("ks0.priority=3", set("keyslots.0.priority", json!(3)));
    add(
        "ks0.priority=string",
        set("keyslots.0.priority", json!("1")),
    );
    add("ks0.type=empty", set("keyslots.0.type", json!("")));
    add("ks0.type=number", set("keyslots.0.type", json!(2)));
    add("ks0.type-missing", remove("keyslots.0.type"));
    add("ks0.not-an-object", set("keyslots.0", json!([])));
    add(
        "ks1.type=luks2-but-unreferenced",
        set("digests.0.keyslots", json!(["0"])),
    );

    // ---- unknown keyslot types (issue 8) ----
    let foreign = |off: u64, size: u64| {
        json!({"type": "foo", "key_size": 64,
               "area": {"type": "raw", "offset": off.to_string(), "size": size.to_string()}})
    };
    add(
        "ks5.foreign-over-data-issue8",
        set(
            "keyslots.5",
            json!({"type": "foo",
            "area": {"offset": b.data_offset.to_string(), "size": "1073741824"}}),
        ),
    );
    add(
        "ks5.foreign-over-data-with-type-and-key_size",
        set("keyslots.5", foreign(b.data_offset, 1 << 30)),
    );
    add(
        "ks5.foreign-in-free-space",
        set("keyslots.5", foreign(ks_end - 8192, 4096)),
    );
    add(
        "ks5.foreign-overlapping-slot0",
        set("keyslots.5", foreign(o0, 4096)),
    );
    add(
        "ks5.foreign-in-json-area",
        set("keyslots.5", foreign(4096, 4096)),
    );
    add(
        "ks5.foreign-crossing-end",
        set("keyslots.5", foreign(ks_end - 4096, 8192)),
    );
    add(
        "ks5.foreign-size-zero",
        set("keyslots.5", foreign(ks_end - 8192, 0)),
    );
    add(
        "ks5.foreign-no-area",
        set("keyslots.5", json!({"type": "foo", "key_size": 64})),
    );
    add(
        "ks5.foreign-no-key_size",
        set(
            "keyslots.5",
            json!({"type": "foo",
            "area": {"type": "raw", "offset": (ks_end - 8192).to_string(), "size": "4096"}}),
        ),
    );
    add(
        "ks5.foreign-area-number",
        set(
            "keyslots.5",
            json!({"type": "foo", "key_size": 64,
            "area": {"type": "raw", "offset": ks_end - 8192, "size": 4096}}),
        ),
    );
    add(
        "ks5.foreign-referenced-by-digest",
        edits(vec![
            set("keyslots.5", foreign(ks_end - 8192, 4096)),
            set("digests.0.keyslots", json!(["0", "1", "5"])),
        ]),
    );
    add(
        "ks5.foreign-referenced-by-token",
        edits(vec![
            set("keyslots.5", foreign(ks_end - 8192, 4096)),
            set("tokens.3", json!({"type": "x-test", "keyslots": ["5"]})),
        ]),
    );
    add(
        "ks5.type=reencrypt",
        set(
            "keyslots.5",
            json!({"type": "reencrypt", "key_size": 1,
        "area": {"type": "none", "offset": (ks_end - 8192).to_string(), "size": "4096"}}),
        ),
    );

    // ---- keyslot ids ----
    for id in ["01", "32", "1000", "abc", "", "-1", "4294967296"] {
        let id = id.to_string();
        add(
            &format!("keyslot-id={id:?}"),
            Box::new(move |v: &mut Value| {
                let ks = v["keyslots"]["1"].clone();
                let o = v["keyslots"].as_object_mut().unwrap();
                o.remove("1");
                o.insert(id.clone(), ks);
                v["digests"]["0"]["keyslots"] = json!(["0", id.clone()]);
            }),
        );
    }

    // ---- digests ----
    for (name, v) in [
        ("missing-slot", json!(["0", "1", "7"])),
        ("duplicate", json!(["0", "0", "1"])),
        ("empty", json!([])),
        ("only-0", json!(["0"])),
        ("numbers", json!([0, 1])),
        ("not-array", json!("0")),
        ("id-40", json!(["0", "1", "40"])),
    ] {
        add(
            &format!("digest.keyslots={name}"),
            set("digests.0.keyslots", v),
        );
    }
    for (name, v) in [
        ("missing-segment", json!(["0", "1"])),
        ("empty", json!([])),
        ("duplicate", json!(["0", "0"])),
        ("number", json!([0])),
    ] {
        add(
            &format!("digest.segments={name}"),
            set("digests.0.segments", v),
        );
    }
    add("digest.type=foo", set("digests.0.type", json!("foo")));
    add("digest.hash=md5", set("digests.0.hash", json!("md5")));
    add("digest.iterations=0", set("digests.0.iterations", json!(0)));
    add(
        "digest.iterations=string",
        set("digests.0.iterations", json!("1000")),
    );
    add("digest.salt-empty", set("digests.0.salt", json!("")));
    add(
        "digest.digest-short",
        set("digests.0.digest", json!("AAAA")),
    );
    add("digest.digest-missing", remove("digests.0.digest"));
    add(
        "digest.second-for-slot1",
        Box::new(|v: &mut Value| {
            let d = v["digests"]["0"].clone();
            v["digests"]["1"] = d;
            v["digests"]["1"]["keyslots"] = json!(["1"]);
            v["digests"]["1"]["segments"] = json!([]);
        }),
    );
    add(
        "digest.two-claim-slot1",
        Box::new(|v: &mut Value| {
            let d = v["digests"]["0"].clone();
            v["digests"]["1"] = d;
            v["digests"]["1"]["keyslots"] = json!(["1"]);
        }),
    );
    add(
        "digest-id=01",
        Box::new(|v: &mut Value| {
            let d = v["digests"]["0"].clone();
            v["digests"] = json!({ "01": d });
        }),
    );
    add("digests-empty", set("digests", json!({})));

    // ---- segments ----
    for (name, off) in [
        ("zero", 0),
        ("unaligned", b.data_offset + 1),
        ("inside-keyslots-area", ks_end - 4096),
        ("at-keyslots-end", ks_end),
        ("beyond-device", 1 << 40),
        ("u64-max-aligned", u64::MAX - 511),
        ("plus-4096", b.data_offset + 4096),
    ] {
        add(
            &format!("segment.offset={name}"),
            set("segments.0.offset", s(off)),
        );
    }
    for (name, v) in [
        ("zero", json!("0")),
        ("unaligned", json!("1000")),
        ("512", json!("512")),
        ("1MiB", json!("1048576")),
        ("huge", json!("18446744073709551104")),
        ("number", json!(1048576)),
        ("dynamicx", json!("dynamicx")),
    ] {
        add(&format!("segment.size={name}"), set("segments.0.size", v));
    }
    for ss in [
        json!(0),
        json!(256),
        json!(513),
        json!(1024),
        json!(8192),
        json!(-512),
        json!("4096"),
    ] {
        add(
            &format!("segment.sector_size={ss}"),
            set("segments.0.sector_size", ss),
        );
    }
    for (name, v) in [
        ("1", json!("1")),
        ("abc", json!("abc")),
        ("number", json!(0)),
    ] {
        add(
            &format!("segment.iv_tweak={name}"),
            set("segments.0.iv_tweak", v),
        );
    }
    add(
        "segment.encryption=aes-cbc",
        set("segments.0.encryption", json!("aes-cbc-essiv:sha256")),
    );
    add(
        "segment.encryption=empty",
        set("segments.0.encryption", json!("")),
    );
    add(
        "segment.type=linear",
        set("segments.0.type", json!("linear")),
    );
    add(
        "segment.flags=not-array",
        set("segments.0.flags", json!("x")),
    );
    add("segment.flags=[1]", set("segments.0.flags", json!([1])));
    add(
        "segment.integrity",
        set(
            "segments.0.integrity",
            json!({"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"}),
        ),
    );
    for m in [
        "offset",
        "size",
        "iv_tweak",
        "encryption",
        "sector_size",
        "type",
    ] {
        add(
            &format!("segment-missing-{m}"),
            remove(leak(format!("segments.0.{m}"))),
        );
    }
    add("segments-empty", set("segments", json!({})));
    add(
        "segment-id=1-only",
        Box::new(|v: &mut Value| {
            let sg = v["segments"]["0"].clone();
            v["segments"] = json!({ "1": sg });
            v["digests"]["0"]["segments"] = json!(["1"]);
        }),
    );
    add(
        "segment-second-overlapping",
        Box::new(|v: &mut Value| {
            let sg = v["segments"]["0"].clone();
            v["segments"]["1"] = sg;
            v["segments"]["0"]["size"] = json!("1048576");
        }),
    );

    // ---- config ----
    for (name, v) in [
        ("zero", json!("0")),
        ("unaligned", json!((b.keyslots_size + 512).to_string())),
        ("over-128MiB", json!("134221824")),
        (
            "past-data-offset",
            json!((b.data_offset - ks_start + 4096).to_string()),
        ),
        ("smaller-than-areas", json!((o1 - ks_start).to_string())),
        ("number", json!(b.keyslots_size)),
    ] {
        add(
            &format!("config.keyslots_size={name}"),
            set("config.keyslots_size", v),
        );
    }
    for (name, v) in [
        ("double", json!(((b.hdr_size - 4096) * 2).to_string())),
        ("minus-4096", json!((b.hdr_size - 8192).to_string())),
        ("number", json!(b.hdr_size - 4096)),
    ] {
        add(
            &format!("config.json_size={name}"),
            set("config.json_size", v),
        );
    }
    add(
        "config.flags=not-array",
        set("config.flags", json!("allow-discards")),
    );
    add("config.flags=[1]", set("config.flags", json!([1])));
    add(
        "config.flags=unknown",
        set("config.flags", json!(["allow-discards", "who-knows"])),
    );
    add(
        "config.requirements=mandatory-foo",
        set("config.requirements", json!({"mandatory": ["foo"]})),
    );
    add(
        "config.requirements=not-object",
        set("config.requirements", json!(["foo"])),
    );
    add(
        "config.requirements=empty",
        set("config.requirements", json!({"mandatory": []})),
    );
    add("config-missing", remove("config"));

    // ---- tokens ----
    for (name, v) in [
        ("valid", json!({"type": "x-test", "keyslots": ["0"]})),
        ("missing-slot", json!({"type": "x-test", "keyslots": ["9"]})),
        ("no-slots", json!({"type": "x-test", "keyslots": []})),
        (
            "duplicate-slots",
            json!({"type": "x-test", "keyslots": ["0", "0"]}),
        ),
        (
            "slots-not-array",
            json!({"type": "x-test", "keyslots": "0"}),
        ),
        ("slots-numbers", json!({"type": "x-test", "keyslots": [0]})),
        ("slots-missing", json!({"type": "x-test"})),
        ("type-empty", json!({"type": "", "keyslots": ["0"]})),
        ("type-missing", json!({"keyslots": ["0"]})),
        ("type-number", json!({"type": 7, "keyslots": ["0"]})),
        (
            "luks2-keyring",
            json!({"type": "luks2-keyring", "keyslots": ["0"], "key_description": "k"}),
        ),
        ("not-object", json!("token")),
    ] {
        add(&format!("token0={name}"), set("tokens.0", v));
    }
    for id in ["32", "01", "abc"] {
        let id = id.to_string();
        add(
            &format!("token-id={id:?}"),
            Box::new(move |v: &mut Value| {
                v["tokens"][id.as_str()] = json!({"type": "x-test", "keyslots": ["0"]});
            }),
        );
    }

    // ---- top level ----
    for m in ["keyslots", "tokens", "segments", "digests"] {
        add(&format!("top-missing-{m}"), remove(m));
        add(&format!("top-{m}-not-object"), set(m, json!([])));
    }
    add("top-unknown-member", set("future", json!({"x": 1})));

    let mut out: Vec<Case> = list
        .into_iter()
        .map(|(name, edit)| {
            let mut v = base_json.clone();
            edit(&mut v);
            Case {
                name,
                json: serde_json::to_vec(&v).unwrap(),
            }
        })
        .collect();

    // ---- raw text: duplicate object members (JSON allows them; which one wins?) ----
    let text = serde_json::to_string(base_json).unwrap();
    let ks1 = serde_json::to_string(&base_json["keyslots"]["1"]).unwrap();
    let mut bad1 = base_json["keyslots"]["1"].clone();
    bad1["area"]["offset"] = s(b.data_offset);
    let bad1 = serde_json::to_string(&bad1).unwrap();
    let dup = |first: &str, second: &str| {
        text.replacen(
            &format!("\"1\":{ks1}"),
            &format!("\"1\":{first},\"1\":{second}"),
            1,
        )
    };
    out.push(Case {
        name: "dup-keyslot-1:bad-then-good".into(),
        json: dup(&bad1, &ks1).into_bytes(),
    });
    out.push(Case {
        name: "dup-keyslot-1:good-then-bad".into(),
        json: dup(&ks1, &bad1).into_bytes(),
    });
    let cfg = serde_json::to_string(&base_json["config"]).unwrap();
    out.push(Case {
        name: "dup-config:second-bad".into(),
        json: text
            .replacen(
                &format!("\"config\":{cfg}"),
                &format!("\"config\":{cfg},\"config\":{{}}"),
                1,
            )
            .into_bytes(),
    });
    out.push(Case {
        name: "trailing-garbage".into(),
        json: format!("{text} x").into_bytes(),
    });
    out.push(Case {
        name: "truncated-text".into(),
        json: text.as_bytes()[..text.len() / 2].to_vec(),
    });
    out.push(Case {
        name: "not-an-object".into(),
        json: b"[1,2,3]".to_vec(),
    });
    out.push(Case {
        name: "deeply-nested".into(),
        json: {
            let mut v = base_json.clone();
            let deep = "[".repeat(3000) + &"]".repeat(3000);
            v["future"] = serde_json::from_str::<Value>("null").unwrap();
            serde_json::to_string(&v)
                .unwrap()
                .replacen("\"future\":null", &format!("\"future\":{deep}"), 1)
                .into_bytes()
        },
    });
    out
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// The JSON text of the primary header of `img` and its `hdr_size`.
pub fn read_json(img: &File) -> (Value, u64) {
    let mut bin = [0u8; 4096];
    img.read_exact_at(&mut bin, 0).unwrap();
    let hdr_size = u64::from_be_bytes(bin[8..16].try_into().unwrap());
    let mut area = vec![0u8; (hdr_size - 4096) as usize];
    img.read_exact_at(&mut area, 4096).unwrap();
    let end = area.iter().position(|&b| b == 0).unwrap();
    (serde_json::from_slice(&area[..end]).unwrap(), hdr_size)
}

/// Both header copies of `orig` (its first `2 * hdr_size` bytes) with `json` as their JSON text
/// and fresh valid checksums (binary fields, seqid and salts kept).
pub fn headers_with(orig: &[u8], hdr_size: u64, json: &[u8]) -> Vec<u8> {
    let hs = hdr_size as usize;
    assert!(
        json.len() < hs - 4096,
        "mangled JSON of {} bytes does not fit",
        json.len()
    );
    let mut out = orig[..2 * hs].to_vec();
    for copy in [0, hs] {
        let area = &mut out[copy + 4096..copy + hs];
        area.fill(0);
        area[..json.len()].copy_from_slice(json);
        // Checksum: sha256 over the copy with the csum field (448..512) zeroed.
        out[copy + 448..copy + 512].fill(0);
        let mut h = Sha256::new();
        h.update(&out[copy..copy + hs]);
        let c = h.finalize();
        out[copy + 448..copy + 448 + 32].copy_from_slice(c.as_slice());
    }
    out
}

/// Rewrites the JSON of both header copies of `img` with `edit` applied, with fresh valid
/// checksums, as anyone who can write the disk could (cryptsetup refuses some such edits, e.g.
/// of a header in re-encryption).
#[allow(dead_code)] // not every test that includes this file edits headers
pub fn rewrite_json(img: &Path, edit: impl FnOnce(&mut Value)) {
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let (mut json, hdr_size) = read_json(&f);
    let mut orig = vec![0u8; 2 * hdr_size as usize];
    f.read_exact_at(&mut orig, 0).unwrap();
    edit(&mut json);
    let text = serde_json::to_vec(&json).unwrap();
    f.write_all_at(&headers_with(&orig, hdr_size, &text), 0)
        .unwrap();
    f.sync_all().unwrap();
}
