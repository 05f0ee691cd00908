//! CLI habits: completions and man pages generated from the clap definitions of both
//! binaries, `--json` on the reporting commands, progress as plain lines without a terminal.

use nbdcrypt_tests::*;
use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

fn ctl(args: &[&str]) -> Out {
    let v: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    nbdcryptctl(&v)
}

/// What bash's completion function offers for `words` (the last one being completed).
fn bash_complete(program: &str, script: &str, words: &[&str]) -> String {
    let dir = tempdir();
    let f = dir.path().join("completion.bash");
    std::fs::write(&f, script).unwrap();
    let line = words.join(" ");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "source {f}\nCOMP_WORDS=({words})\nCOMP_CWORD={cword}\nCOMP_LINE='{line}'\nCOMP_POINT=${{#COMP_LINE}}\n\
         _{program} {program} '{cur}' '{prev}'\necho \"${{COMPREPLY[@]}}\"\n",
        f = f.display(),
        words = quoted.join(" "),
        cword = words.len() - 1,
        cur = words[words.len() - 1],
        prev = words[words.len() - 2],
    );
    run(
        Command::new("bash").arg("-c").arg(prog),
        Duration::from_secs(20),
    )
    .success()
    .stdout
}

#[test]
fn bash_completions_complete_subcommands_and_flags_of_both_programs() {
    let script = ctl(&["completions", "bash"]).success().stdout;
    let got = bash_complete("nbdcryptctl", &script, &["nbdcryptctl", "be"]);
    assert!(got.split_whitespace().any(|w| w == "bench"), "{got}");
    let got = bash_complete("nbdcryptctl", &script, &["nbdcryptctl", "top", "--con"]);
    assert!(got.contains("--control"), "{got}");
    let script = ctl(&["completions", "bash", "--for", "nbdcryptd"])
        .success()
        .stdout;
    let got = bash_complete("nbdcryptd", &script, &["nbdcryptd", "--metr"]);
    assert!(got.contains("--metrics"), "{got}");
    let zsh = ctl(&["completions", "zsh"]).success().stdout;
    assert!(zsh.starts_with("#compdef nbdcryptctl"), "{zsh}");
    let fish = ctl(&["completions", "fish", "--for", "nbdcryptd"])
        .success()
        .stdout;
    assert!(
        fish.contains("complete -c nbdcryptd") && fish.contains("-l metrics"),
        "{fish}"
    );
    assert!(
        !ctl(&["completions", "tcsh"]).ok(),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_pages_for_every_subcommand_and_the_daemon() {
    let dir = tempdir();
    ctl(&["man", dir.path().to_str().unwrap()]).success();
    for page in [
        "nbdcryptctl.1",
        "nbdcryptctl-top.1",
        "nbdcryptctl-bench.1",
        "nbdcryptctl-unlock.1",
        "nbdcryptd.8",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is not roff:\n{text}"
        );
    }
    let d = std::fs::read_to_string(dir.path().join("nbdcryptd.8")).unwrap();
    assert!(d.contains(".TH nbdcryptd 8"), "{d}");
    assert!(d.contains("metrics"), "the daemon page lists --metrics");
}

#[test]
fn test_key_json_names_the_keyslot() {
    let dir = tempdir();
    let img = dir.path().join("v.img");
    luks_format(&img, 4 * MIB, 4096, "pbkdf2", b"json pass");
    let key = dir.path().join("k");
    std::fs::write(&key, b"json pass").unwrap();
    let out = ctl(&[
        "test-key",
        img.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--json",
    ])
    .success();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect(&out.stdout);
    assert_eq!(v["keyslot"], 0, "{v}");
    assert!(v["uuid"].as_str().is_some_and(|u| u.len() == 36), "{v}");
    std::fs::write(&key, b"wrong").unwrap();
    let out = ctl(&[
        "test-key",
        img.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.code(), Some(3), "{}", out.details());
}

#[test]
fn progress_without_a_terminal_is_plain_lines() {
    let out = ctl(&["bench", "--seconds", "0.01"]).success();
    assert!(!out.stderr.contains('\r'), "{:?}", out.stderr);
    assert!(
        out.stderr.lines().any(|l| l.starts_with("bench: 50%")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("bench: 100%")),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("aes-xts-plain64"), "{}", out.stdout);
}
