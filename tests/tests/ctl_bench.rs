//! `nbdcryptctl bench`: the cipher table for every key size and sector size with the selected
//! implementation, and `--volume` end to end through temporary daemons, leaving nothing behind.

use nbdcrypt_tests::*;
use std::ffi::OsStr;

fn json(args: &[&str]) -> serde_json::Value {
    let v: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let out = nbdcryptctl(&v).success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[test]
fn cipher_bench_covers_both_key_sizes_and_sector_sizes() {
    let r = json(&["bench", "--json", "--seconds", "0.05"]);
    let selected = r["selected_implementation"].as_str().unwrap().to_owned();
    assert!(
        ["vaes512", "portable"].contains(&selected.as_str()),
        "{r:#}"
    );
    let rows: Vec<_> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["selected"] == true)
        .collect();
    let mut cells: Vec<(u64, u64)> = rows
        .iter()
        .map(|x| {
            assert_eq!(x["implementation"], selected.as_str());
            assert!(x["encrypt_gb_per_s"].as_f64().unwrap() > 0.0, "{x}");
            assert!(x["decrypt_gb_per_s"].as_f64().unwrap() > 0.0, "{x}");
            (
                x["key_bits"].as_u64().unwrap(),
                x["sector_size"].as_u64().unwrap(),
            )
        })
        .collect();
    cells.sort();
    assert_eq!(cells, [(256, 512), (256, 4096), (512, 512), (512, 4096)]);
}

#[test]
fn volume_bench_compares_against_plain_and_cleans_up() {
    let dir = tempdir();
    let d = dir.path().to_str().unwrap();
    let r = json(&[
        "bench",
        "--volume",
        "--json",
        "--seconds",
        "0.2",
        "--size",
        "16M",
        "--dir",
        d,
        "--daemon",
        daemon_binary().to_str().unwrap(),
    ]);
    let rows = r["results"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{r:#}");
    for x in rows {
        assert!(x["encrypted_iops"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["plain_iops"].as_f64().unwrap() > 0.0, "{x}");
        assert!(x["ratio"].as_f64().unwrap() > 0.0, "{x}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "bench left files behind"
    );
}
