//! libnbd-style NBD URIs (the subset nbdcrypt speaks as a client):
//! `nbd://host[:port]/export`, `nbds://host[:port]/export`, `nbd+unix:///export?socket=PATH`,
//! `nbds+unix:///export?socket=PATH`. Query parameters: `socket=` (Unix forms),
//! `tls-certificates=DIR` (ca-cert.pem, optional client-cert.pem + client-key.pem), and
//! `tls-hostname=NAME` (the name checked in the server certificate).

use std::fmt;
use std::path::PathBuf;

/// The well-known NBD port.
pub const DEFAULT_PORT: u16 = 10809;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A parsed upstream URI.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UpstreamUri {
    pub tls: bool,
    pub address: Address,
    pub export: String,
    pub tls_certificates: Option<PathBuf>,
    pub tls_hostname: Option<String>,
}

/// Whether `s` names an upstream NBD export rather than a local path.
pub fn is_upstream_uri(s: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
}

impl fmt::Display for UpstreamUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.tls { "nbds" } else { "nbd" };
        match &self.address {
            Address::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "{s}://[{host}]:{port}/{}", self.export)
                } else {
                    write!(f, "{s}://{host}:{port}/{}", self.export)
                }
            }
            Address::Unix(p) => write!(f, "{s}+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in the {what}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8"))
}

impl UpstreamUri {
    pub fn parse(uri: &str) -> Result<UpstreamUri, String> {
        let bad = |why: &str| {
            format!(
                "{uri:?} is not an upstream URI ({why}); use nbd://host[:port]/export, \
                 nbds://host[:port]/export, nbd+unix:///export?socket=PATH or \
                 nbds+unix:///export?socket=PATH"
            )
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("unknown scheme")),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        if rest.contains('#') || query.contains('#') {
            return Err(bad("fragments are not supported"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path, "export name")?;
        if export.len() > 4096 {
            return Err(bad("export name longer than 4096 bytes"));
        }
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v, "query")?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => tls_certificates = Some(PathBuf::from(v)),
                "tls-hostname" => tls_hostname = Some(v),
                other => return Err(bad(&format!("unknown query parameter {other:?}"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    "a Unix-socket URI has no host (three slashes: nbd+unix:///)",
                ));
            }
            Address::Unix(socket.ok_or_else(|| bad("missing ?socket=PATH"))?)
        } else {
            if socket.is_some() {
                return Err(bad("socket= is only for nbd+unix:// and nbds+unix://"));
            }
            let (host, port) = if let Some(r) = authority.strip_prefix('[') {
                let (h, p) = r
                    .split_once(']')
                    .ok_or_else(|| bad("unclosed [ in the host"))?;
                (h, p.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            let port = match port {
                Some(p) => p.parse::<u16>().map_err(|_| bad("bad port"))?,
                None => DEFAULT_PORT,
            };
            Address::Tcp {
                host: host.to_owned(),
                port,
            }
        };
        if !tls && (tls_certificates.is_some() || tls_hostname.is_some()) {
            return Err(bad("tls-* parameters need nbds:// or nbds+unix://"));
        }
        Ok(UpstreamUri {
            tls,
            address,
            export,
            tls_certificates,
            tls_hostname,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_forms() {
        let u = UpstreamUri::parse("nbd://example.org/vol").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "example.org".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "vol");
        assert!(!u.tls);
        let u = UpstreamUri::parse("nbds://[::1]:2000/a%20b?tls-certificates=/etc/c").unwrap();
        assert!(u.tls);
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: 2000
            }
        );
        assert_eq!(u.export, "a b");
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/etc/c")));
        let u = UpstreamUri::parse("nbd+unix:///?socket=/tmp/s.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(u.export, "");
        let u = UpstreamUri::parse("nbds+unix:///e?socket=/s&tls-hostname=h").unwrap();
        assert!(u.tls);
        assert_eq!(u.tls_hostname.as_deref(), Some("h"));
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        for bad in [
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd://:10/x",
            "nbd://h:99999/x",
            "nbd://h/x?tls-certificates=/d",
            "nbd://h/x?bogus=1",
            "nbd://h/%zz",
            "http://h/x",
            "nbd://h/x?socket=/s",
        ] {
            assert!(UpstreamUri::parse(bad).is_err(), "{bad}");
        }
        assert!(is_upstream_uri("nbds+unix:///x?socket=/s"));
        assert!(!is_upstream_uri("/dev/nbd0"));
    }
}
