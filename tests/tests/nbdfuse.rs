//! nbdfuse: the export as a file in a FUSE mount, driven with ordinary file I/O.

use nbdcrypt_tests::*;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nbdfuse; unmounted and reaped on drop.
struct Fuse {
    child: Child,
    mnt: PathBuf,
}

impl Fuse {
    fn mount(d: &Daemon) -> Fuse {
        let mnt = d.dir().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let disk = mnt.join("disk");
        let child = tool("nbdfuse")
            .arg(&disk)
            .arg("--unix")
            .arg(&d.sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.dir().join("nbdfuse.log")).unwrap())
            .spawn()
            .expect("start nbdfuse");
        let mut f = Fuse { child, mnt };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !disk.exists() {
            if let Some(st) = f.child.try_wait().unwrap() {
                panic!(
                    "nbdfuse exited with {st}:\n{}",
                    std::fs::read_to_string(d.dir().join("nbdfuse.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not mount within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    fn disk(&self) -> PathBuf {
        self.mnt.join("disk")
    }

    /// Unmount and wait for nbdfuse to exit; panics if it does not.
    fn unmount(mut self) {
        let st = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .expect("run umount");
        assert!(st.success(), "umount {} failed", self.mnt.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse still running 10 s after umount"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn nbdfuse_exposes_the_export_as_a_file_that_reads_and_writes_through() {
    let size = 16 * MIB;
    let d = Daemon::plain(size, &[]);
    let fuse = Fuse::mount(&d);
    let disk = fuse.disk();
    assert_eq!(
        std::fs::metadata(&disk).unwrap().len(),
        size,
        "size of the FUSE file"
    );

    let data = random_bytes(41, 4 * MIB as usize);
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.write_all_at(&data, MIB).unwrap();
        f.write_all_at(b"unaligned!", 7 * MIB + 13).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, MIB).unwrap();
        assert!(
            back == data,
            "read back through FUSE differs at {:?}",
            first_difference(&back, &data)
        );
    }
    // Visible to another client and in the backing file.
    let out = nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        assert h.pread(10, 7 * 1024 * 1024 + 13) == b"unaligned!"
    "#,
    );
    out.success();
    assert!(
        read_at(&d.image, MIB, data.len()) == data,
        "backing file differs"
    );
    assert_eq!(read_at(&d.image, 7 * MIB + 13, 10), b"unaligned!".to_vec());
    fuse.unmount();
}
