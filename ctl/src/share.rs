//! `nbdcryptctl unlock --share NAME`: one person gives their share of a quorum to a running
//! nbdcryptd. The passphrase goes over the control socket (root-only, peer credentials
//! audited) like an unlock passphrase; the daemon checks it against the share's tag, keeps the
//! share in locked memory and answers how many of the needed shares it holds.

use nbdcrypt::control::proto::{ErrorKind, Request, Response, VolumeState};

use crate::exit::Failure;
use crate::online::{call, refusal, UnlockArgs};
use crate::secret::{self, Source};

pub fn give(args: UnlockArgs, name: String) -> Result<(), Failure> {
    let source = match (&args.key_file, args.stdin) {
        (Some(path), _) => Source::KeyFile(path.clone()),
        (None, true) => Source::StdinLine,
        (None, false) => {
            let s = match call(&args.control, &Request::Status)? {
                Response::Ok(s) => s,
                Response::Error(e) => return Err(refusal(e)),
            };
            if s.state == VolumeState::Unlocked {
                eprintln!("nbdcryptctl: the volume is already unlocked; nothing to do");
                return Ok(());
            }
            Source::Tty {
                prompt: format!(
                    "Passphrase of share {name} for nbdcrypt volume {}: ",
                    s.volume_uuid
                ),
            }
        }
    };
    let secret = secret::read(&source)?;
    let request = Request::Share {
        name: name.clone(),
        secret,
    };
    let response = call(&args.control, &request);
    drop(request); // wipes the secret
    match response? {
        Response::Ok(s) if s.state == VolumeState::Unlocked => {
            println!(
                "share {name} accepted; the quorum is complete: unlocked, export {:?}",
                s.export_name
            );
            Ok(())
        }
        Response::Ok(s) => {
            let quorum = s
                .locked_reason
                .as_deref()
                .and_then(|r| r.split("; ").find(|p| p.starts_with("quorum")))
                .unwrap_or("waiting for the other shares");
            println!("share {name} accepted; {quorum}");
            Ok(())
        }
        Response::Error(e) if e.kind == ErrorKind::AlreadyUnlocked => {
            eprintln!("nbdcryptctl: the volume is already unlocked; nothing to do");
            Ok(())
        }
        Response::Error(e) => Err(refusal(e)),
    }
}
