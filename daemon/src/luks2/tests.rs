//! Golden and cross-implementation tests: the cryptsetup-made images in
//! `shared/testdata/luks2/`, and volumes we format checked by the real `cryptsetup`.

use std::path::PathBuf;

/// `shared/testdata/luks2`, beside the repository in CI (`../shared`) or at `/work/shared`.
/// Missing test data is a failure, not a skip.
pub(crate) fn testdata_dir() -> PathBuf {
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testdata/luks2");
    if beside.join("README.md").exists() {
        return beside;
    }
    let fixed = PathBuf::from("/work/shared/testdata/luks2");
    if fixed.join("README.md").exists() {
        return fixed;
    }
    panic!(
        "LUKS2 test data not found at {} or {}: check out `shared/` beside the repository",
        beside.display(),
        fixed.display()
    );
}
