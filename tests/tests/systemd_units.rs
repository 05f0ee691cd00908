//! The shipped systemd units pass `systemd-analyze verify` (with the paths pointed at the built
//! binaries), and the daemon unit's hardening keeps its exposure score low.

use std::path::{Path, PathBuf};

use nbdcrypt_tests::{daemon_binary, run, tempdir, tool, TOOL_TIMEOUT};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Copy every unit into `dir` as instance "db", pointing ExecStart at the built binaries.
fn install_units(dir: &Path) -> Vec<PathBuf> {
    let bin = daemon_binary();
    let ctl = bin.with_file_name("nbdcryptctl");
    assert!(
        ctl.exists(),
        "{} missing: run cargo build --workspace --bins first",
        ctl.display()
    );
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let target = if name.ends_with(".mount.example") {
            name.trim_end_matches(".example").to_owned()
        } else if name.ends_with(".service") || name.ends_with(".timer") {
            name.replacen("@.", "@db.", 1)
        } else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/nbdcryptd", &bin.to_string_lossy())
            .replace("/usr/local/bin/nbdcryptctl", &ctl.to_string_lossy());
        let dest = dir.join(target);
        std::fs::write(&dest, text).unwrap();
        out.push(dest);
    }
    out.sort();
    out
}

#[test]
fn every_unit_passes_systemd_analyze_verify_without_warnings() {
    let dir = tempdir();
    let units = install_units(dir.path());
    assert!(
        units.len() >= 5,
        "expected the daemon, attach, rekey service+timer and mount units: {units:?}"
    );
    for unit in &units {
        let out = run(
            tool("systemd-analyze")
                .arg("verify")
                .arg("--man=no")
                .arg(unit),
            TOOL_TIMEOUT,
        );
        assert!(out.ok(), "{}: {}", unit.display(), out.details());
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        let complaints: Vec<&str> = out
            .stderr
            .lines()
            .chain(out.stdout.lines())
            .filter(|l| l.contains(&name))
            .collect();
        assert!(
            complaints.is_empty(),
            "systemd-analyze complained about {name}: {complaints:#?}"
        );
    }
}

#[test]
fn the_daemon_unit_is_hardened_to_an_exposure_below_3() {
    let dir = tempdir();
    install_units(dir.path());
    let unit = dir.path().join("nbdcryptd@db.service");
    let out = run(
        tool("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&unit),
        TOOL_TIMEOUT,
    );
    let text = format!("{}{}", out.stdout, out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for nbdcryptd@db.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in: {text}"));
    assert!(score < 3.0, "exposure {score} (want < 3.0):\n{text}");
}

#[test]
fn the_example_config_is_accepted_by_the_daemon() {
    // --config with a missing volume must fail on the volume, not on the file's syntax.
    let out = run(
        std::process::Command::new(daemon_binary())
            .arg("--config")
            .arg(repo().join("systemd/example.toml"))
            .args(["--unix", "/nonexistent/dir/s.sock"]),
        TOOL_TIMEOUT,
    );
    assert!(!out.ok());
    assert!(
        out.stderr.contains("/var/lib/nbdcrypt/db.img"),
        "{}",
        out.details()
    );
}
