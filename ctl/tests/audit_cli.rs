//! Key-changing offline commands leave one JSON line each in `--audit-log`, with the volume
//! UUID and keyslot, and never a passphrase.

use std::process::{Command, Output, Stdio};

fn ctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nbdcryptctl"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("nbdcryptctl")
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn add_remove_key_and_header_backup_are_audited_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    std::fs::write(p("old.key"), "first passphrase").unwrap();
    std::fs::write(p("new.key"), "second passphrase").unwrap();
    let fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];
    let (vol, audit) = (p("vol.img"), p("audit.jsonl"));
    ok(ctl(&[
        &["format", &vol, "--size", "20M", "--key-file", &p("old.key")][..],
        &fast,
    ]
    .concat()));
    ok(ctl(&[
        &[
            "add-key",
            &vol,
            "--key-file",
            &p("old.key"),
            "--new-key-file",
            &p("new.key"),
            "--audit-log",
            &audit,
        ][..],
        &fast,
    ]
    .concat()));
    ok(ctl(&[
        "remove-key",
        &vol,
        "--slot",
        "1",
        "--key-file",
        &p("old.key"),
        "--audit-log",
        &audit,
    ]));
    ok(ctl(&[
        "header-backup",
        &vol,
        "--file",
        &p("hdr.bak"),
        "--audit-log",
        &audit,
    ]));
    // A failure is recorded too.
    let o = ctl(&[
        "remove-key",
        &vol,
        "--slot",
        "0",
        "--force",
        "--audit-log",
        &audit,
    ]);
    assert!(
        !o.status.success(),
        "the last keyslot must not be removable"
    );

    let text = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["add_key", "remove_key", "header_backup", "remove_key"],
        "{text}"
    );
    assert_eq!(events[0]["keyslot"], 1, "{text}");
    assert!(
        events
            .iter()
            .all(|e| e["volume_uuid"].as_str().is_some_and(|u| u.len() == 36)),
        "{text}"
    );
    assert!(
        events[3]["result"] != events[0]["result"],
        "the failed removal is marked: {text}"
    );
    assert!(
        !text.contains("passphrase\"")
            && !text.contains("first passphrase")
            && !text.contains("second passphrase")
    );
}
