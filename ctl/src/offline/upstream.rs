//! Offline commands on a volume that lives on an upstream NBD export (`nbd://`, `nbds://`,
//! `nbd+unix://`, `nbds+unix://`, parsed as `nbdcryptd --volume` parses them): `Volume::open`
//! connects through `nbdcrypt::luks2::VolumeIo::open_upstream` and every command reads and
//! writes the header over NBD. There is no claim and no header lock on an upstream (best
//! effort): what that means for the operator is in [`UPSTREAM_HELP`].

use std::path::Path;

/// The paragraph every offline command's `--help` ends with (before the exit codes).
pub const UPSTREAM_HELP: &str = "\
Volumes on another NBD server: VOLUME may also be a libnbd-style URI of an NBD export, as for
`nbdcryptd --volume`: nbd+unix:///EXPORT?socket=PATH or nbd://HOST[:PORT]/EXPORT, and with TLS
nbds+unix:///EXPORT?socket=PATH&tls-certificates=DIR or nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR
(DIR holds ca-cert.pem, plus client-cert.pem and client-key.pem to present a client certificate;
tls-hostname=NAME checks that name in the server's certificate). Quote the URI in a shell. The
header is read and written over NBD and checked like a local one; `reencrypt` reads and writes
every data byte over NBD, and its crash safety rests on the server honouring FLUSH.
Locking on an upstream is best effort: NBD has no locks, so nothing is locked on the upstream
side. nbdcryptctl cannot see an nbdcryptd (on this or another host) serving the export and takes
no cryptsetup header lock there; it only re-reads the header's sequence number before each update
and refuses if another writer changed it meanwhile. Two writers at once (a daemon serving the
export, a second nbdcryptctl, cryptsetup through nbd-client) can still lose one's keyslot change,
or leave a daemon writing data under a key the header no longer holds. Before any command that
writes, stop every nbdcryptd using the export and make sure none starts until it is done.";

/// The URI, if the VOLUME argument names an upstream NBD export (else it is a local path).
pub fn uri_of(p: &Path) -> Option<&str> {
    p.to_str()
        .filter(|s| nbdcrypt::upstream::is_upstream_uri(s))
}

/// Whether a VOLUME argument names an upstream NBD export.
pub fn is_uri(p: &Path) -> bool {
    uri_of(p).is_some()
}

/// The one-line reminder a command that writes prints on stderr for an upstream.
pub fn warn_unlocked(uri: &str) {
    eprintln!(
        "nbdcryptctl: note: {uri} is an NBD export: no lock protects it; make sure no nbdcryptd \
         serves it while this command runs (see --help)"
    );
}
