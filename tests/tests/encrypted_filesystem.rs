//! A filesystem on the encrypted export, made and checked by the real e2fsprogs through nbdfuse
//! (the kernel's FUSE page cache decides the I/O pattern), then checked again on the plaintext the
//! independent decryptor (`verify.py`) recovers from the image.

use nbdcrypt_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PASS: &[u8] = b"filesystem passphrase";

/// `nbdfuse MOUNTPOINT URI` in the foreground; unmounted and killed on drop.
struct Fuse {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Fuse {
    fn mount(mnt: &Path, uri: &str) -> Fuse {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the nbdfuse test needs FUSE (a container needs --device /dev/fuse)"
        );
        std::fs::create_dir_all(mnt).unwrap();
        let pidfile = mnt.with_extension("pid");
        let child = tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(mnt)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Fuse {
            child: Some(child),
            mnt: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            if let Some(st) = f.child.as_mut().unwrap().try_wait().unwrap() {
                let o = f.child.take().unwrap().wait_with_output().unwrap();
                panic!(
                    "nbdfuse exited ({st}) before mounting: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            assert!(
                Instant::now() < deadline,
                "nbdfuse did not mount within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        f
    }

    fn file(&self) -> PathBuf {
        self.mnt.join("nbd")
    }

    /// Unmount and wait for nbdfuse to exit (it flushes the export on the way out).
    fn unmount(mut self) {
        run(
            Command::new("umount").arg(&self.mnt),
            Duration::from_secs(30),
        )
        .success();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nbdfuse did not exit after umount");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn e2fsck(image: &Path) -> Out {
    let mut c = tool("e2fsck");
    c.arg("-fn").arg(image);
    run(&mut c, TOOL_TIMEOUT)
}

fn debugfs_cat(image: &Path, file: &str) -> Vec<u8> {
    let o = tool("debugfs")
        .arg("-R")
        .arg(format!("cat /{file}"))
        .arg(image)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs");
    assert!(o.status.success(), "debugfs cat /{file} failed");
    o.stdout
}

#[test]
fn an_ext4_filesystem_made_through_nbdfuse_checks_clean_through_nbd_and_in_verify_py_s_decryption_of_the_image(
) {
    let dir = tempdir();
    let img = dir.path().join("volume.img");
    luks_format(&img, 32 * MIB, 4096, "pbkdf2", PASS);
    let d = Daemon::volume_in(dir, &img, &[]);
    assert_eq!(d.unlock(PASS).code(), Some(0), "unlock");

    // Files to put into the filesystem, sizes not multiples of anything.
    let src = d.dir().join("src");
    std::fs::create_dir(&src).unwrap();
    let big = random_bytes(61, 3_000_017);
    let small = b"hello from an encrypted ext4\n".to_vec();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    std::fs::write(src.join("small.txt"), &small).unwrap();

    let fuse = Fuse::mount(&d.dir().join("mnt"), &d.uri());
    let dev = fuse.file();
    assert_eq!(std::fs::metadata(&dev).unwrap().len(), 32 * MIB);
    let mut mkfs = tool("mkfs.ext4");
    mkfs.args(["-q", "-F", "-E", "nodiscard", "-b", "4096", "-d"])
        .arg(&src)
        .arg(&dev);
    run(&mut mkfs, TOOL_TIMEOUT).success();
    e2fsck(&dev).success();
    assert_eq!(
        debugfs_cat(&dev, "big.bin"),
        big,
        "big.bin read back through nbdfuse"
    );
    fuse.unmount();

    // A fresh NBD connection (nbdcopy) sees the same filesystem.
    let copy = d.dir().join("copy.img");
    nbdcopy(d.uri().as_ref(), copy.as_os_str()).success();
    e2fsck(&copy).success();

    // And so does the independent decryptor, reading the image file after the lock.
    let out = d.lock_idle();
    assert_eq!(out.code(), Some(0), "lock\n{}", out.details());
    d.wait_state("locked", Duration::from_secs(10));
    let plain = d.dir().join("plain.img");
    std::fs::write(
        &plain,
        verify_py_plaintext(&img, &luks_volume_key(&img, PASS)),
    )
    .unwrap();
    e2fsck(&plain).success();
    assert_eq!(
        debugfs_cat(&plain, "big.bin"),
        big,
        "big.bin in verify.py's plaintext"
    );
    assert_eq!(
        debugfs_cat(&plain, "small.txt"),
        small,
        "small.txt in verify.py's plaintext"
    );
}
