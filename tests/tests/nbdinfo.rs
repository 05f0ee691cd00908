//! nbdinfo (libnbd) against nbdcryptd --plain: what the server advertises.

use nbdcrypt_tests::*;
use serde_json::Value;

fn b(v: &Value, key: &str) -> bool {
    v[key]
        .as_bool()
        .unwrap_or_else(|| panic!("nbdinfo --json lacks boolean {key}: {v:#}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("nbdinfo --json lacks number {key}: {v:#}"))
}

#[test]
fn nbdinfo_json_reports_size_name_block_sizes_and_the_default_capabilities() {
    let d = Daemon::plain(64 * MIB, &[]);
    let (e, doc) = nbdinfo_json(&d.uri());
    assert_eq!(doc["protocol"], "newstyle-fixed", "{doc:#}");
    assert_eq!(
        doc["structured"], true,
        "structured replies must be negotiated: {doc:#}"
    );
    assert_eq!(e["export-name"], EXPORT, "{e:#}");
    assert_eq!(n(&e, "export-size"), 64 * MIB);
    assert_eq!(n(&e, "block_size_minimum"), 1);
    assert_eq!(n(&e, "block_size_preferred"), 4096);
    assert_eq!(n(&e, "block_size_maximum"), 32 * MIB);
    assert!(b(&e, "can_flush"), "SEND_FLUSH");
    assert!(b(&e, "can_fua"), "SEND_FUA");
    assert!(b(&e, "can_multi_conn"), "CAN_MULTI_CONN");
    assert!(b(&e, "can_zero"), "SEND_WRITE_ZEROES");
    assert!(b(&e, "can_fast_zero"), "SEND_FAST_ZERO on a plain file");
    assert!(b(&e, "can_cache"), "SEND_CACHE");
    assert!(b(&e, "can_df"), "SEND_DF after structured replies");
    assert!(
        !b(&e, "can_trim"),
        "SEND_TRIM must be off without --allow-discards"
    );
    assert!(
        !b(&e, "is_read_only"),
        "READ_ONLY must be off without --read-only"
    );
    let contexts = e["contexts"].as_array().cloned().unwrap_or_default();
    assert!(
        contexts.iter().any(|c| c == "base:allocation"),
        "base:allocation must be offered: {e:#}"
    );
}

#[test]
fn nbdinfo_json_reports_trim_with_allow_discards() {
    let d = Daemon::plain(16 * MIB, &["--allow-discards"]);
    let (e, _) = nbdinfo_json(&d.uri());
    assert!(b(&e, "can_trim"), "{e:#}");
    assert!(!b(&e, "is_read_only"), "{e:#}");
}

#[test]
fn nbdinfo_json_reports_read_only_with_read_only() {
    let d = Daemon::plain(16 * MIB, &["--read-only"]);
    let (e, _) = nbdinfo_json(&d.uri());
    assert!(b(&e, "is_read_only"), "{e:#}");
    assert_eq!(n(&e, "export-size"), 16 * MIB);
}

/// `nbdinfo --can X` exits 0 for true and 2 for false.
fn can(uri: &str, what: &str) -> i32 {
    let out = nbdinfo(&["--can", what, uri]);
    match out.code() {
        Some(c @ (0 | 2)) => c,
        _ => panic!(
            "nbdinfo --can {what} failed: {}\n{}",
            out.status,
            out.details()
        ),
    }
}

#[test]
fn nbdinfo_can_exit_codes_follow_the_advertised_flags() {
    let d = Daemon::plain(16 * MIB, &[]);
    let uri = d.uri();
    for what in [
        "multi-conn",
        "flush",
        "fua",
        "zero",
        "fast-zero",
        "cache",
        "df",
    ] {
        assert_eq!(can(&uri, what), 0, "nbdinfo --can {what} should be true");
    }
    assert_eq!(
        can(&uri, "trim"),
        2,
        "trim must be false without --allow-discards"
    );
    assert_eq!(
        can(&uri, "read-only"),
        2,
        "read-only must be false without --read-only"
    );
}

#[test]
fn nbdinfo_can_trim_is_true_with_allow_discards() {
    let d = Daemon::plain(16 * MIB, &["--allow-discards"]);
    assert_eq!(can(&d.uri(), "trim"), 0);
    assert_eq!(can(&d.uri(), "multi-conn"), 0);
}

#[test]
fn nbdinfo_list_shows_the_export_with_its_name_and_description() {
    let d = Daemon::plain(8 * MIB, &["--name", "vol0", "--description", "test volume"]);
    let list_uri = format!("nbd+unix:///?socket={}", d.sock.display());
    let out = nbdinfo(&["--list", "--json", &list_uri]).success();
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    let exports = doc["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "exactly one export: {doc:#}");
    assert_eq!(exports[0]["export-name"], "vol0", "{doc:#}");
    assert_eq!(exports[0]["description"], "test volume", "{doc:#}");
    assert_eq!(n(&exports[0], "export-size"), 8 * MIB);

    let plain = nbdinfo(&["--list", &list_uri]).success();
    assert!(plain.stdout.contains("export=\"vol0\""), "{}", plain.stdout);
}

#[test]
fn the_default_name_is_listed_as_nbdcrypt() {
    let d = Daemon::plain(8 * MIB, &[]);
    let list_uri = format!("nbd+unix:///?socket={}", d.sock.display());
    let out = nbdinfo(&["--list", "--json", &list_uri]).success();
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["exports"][0]["export-name"], EXPORT, "{doc:#}");
}

#[test]
fn the_empty_export_name_selects_the_default_export() {
    let d = Daemon::plain(8 * MIB, &["--name", "vol0"]);
    let (e, _) = nbdinfo_json(&d.uri_for(""));
    assert_eq!(n(&e, "export-size"), 8 * MIB, "{e:#}");
    let (e, _) = nbdinfo_json(&d.uri_for("vol0"));
    assert_eq!(n(&e, "export-size"), 8 * MIB, "{e:#}");
}

#[test]
fn an_unknown_export_name_is_refused() {
    let d = Daemon::plain(8 * MIB, &[]);
    let out = nbdinfo(&["--size", &d.uri_for("no-such-export")]).failure();
    // libnbd reports the server's NBD_REP_ERR_UNKNOWN as "unknown export" / "not found".
    let msg = out.stderr.to_lowercase();
    assert!(
        msg.contains("unknown")
            || msg.contains("no export")
            || msg.contains("not found")
            || msg.contains("not available"),
        "expected an unknown-export error, got:\n{}",
        out.details()
    );
    // And the right name still works afterwards.
    let out = nbdinfo(&["--size", &d.uri()]).success();
    assert_eq!(out.stdout.trim(), (8 * MIB).to_string());
}

#[test]
fn nbdinfo_map_reports_a_data_region_and_holes_of_a_sparse_plain_file() {
    let dir = tempdir();
    let img = dir.path().join("disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(16 * MIB).unwrap();
        f.write_all_at(&random_bytes(1, MIB as usize), 4 * MIB)
            .unwrap();
        f.sync_all().unwrap();
    }
    let d = Daemon::plain_in(dir, &[]);
    let out = nbdinfo(&["--map", "--json", &d.uri()]).success();
    let map: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json is not JSON ({e}): {}", out.stdout));
    let extents: Vec<(u64, u64, u64)> = map
        .as_array()
        .expect("array of extents")
        .iter()
        .map(|x| (n(x, "offset"), n(x, "length"), n(x, "type")))
        .collect();
    // Extents are contiguous and cover the whole export.
    let mut pos = 0;
    for &(off, len, _) in &extents {
        assert_eq!(off, pos, "extents not contiguous: {extents:?}");
        assert!(len > 0, "zero-length extent: {extents:?}");
        pos += len;
    }
    assert_eq!(
        pos,
        16 * MIB,
        "extents do not cover the export: {extents:?}"
    );
    let type_at = |o: u64| {
        extents
            .iter()
            .find(|e| e.0 <= o && o < e.0 + e.1)
            .unwrap()
            .2
    };
    // The written megabyte is data (no HOLE bit) throughout.
    for o in (4 * MIB..5 * MIB).step_by(64 * 1024) {
        assert_eq!(
            type_at(o) & 1,
            0,
            "offset {o} is written data, reported as hole: {extents:?}"
        );
    }
    // The untouched start and end are holes that read as zero (HOLE|ZERO = 3).
    assert_eq!(type_at(0), 3, "offset 0 is a hole: {extents:?}");
    assert_eq!(type_at(10 * MIB), 3, "offset 10M is a hole: {extents:?}");
    assert_eq!(
        type_at(16 * MIB - 1),
        3,
        "the last byte is in a hole: {extents:?}"
    );
}
