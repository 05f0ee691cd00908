//! A minimal HTTP/1.1 client for Tang (`GET /adv`, `POST /rec/{kid}`): plain `http://` only,
//! as Tang is deployed (its answers are public keys and blinded points, useless to an observer).
//! Bounded in time (connect 5 s, each read or write 10 s) and size (64 KiB answers).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RESPONSE: u64 = 64 * 1024;
/// A whole answer must arrive within this, however slowly the server drips it.
const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);

/// An `http://host[:port][/prefix]` URL, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" or "/tang").
    pub prefix: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: only http:// Tang URLs are supported (Tang's protocol needs no TLS: \
                 its answers are public keys and blinded points)"
            ));
        };
        if url.len() > 2048
            || url
                .bytes()
                .any(|c| c <= b' ' || c == 0x7f || c == b'#' || c == b'?')
        {
            return Err(format!("{url:?} is not a plain http URL"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.contains('@') || authority.is_empty() {
            return Err(format!("{url:?}: no host, or user info in the URL"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                None if after.is_empty() => 80,
                None => return Err(format!("{url:?}: bad host")),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                ),
                None => (authority.to_owned(), 80),
            }
        };
        Ok(HttpUrl {
            host,
            port,
            prefix: path.to_owned(),
        })
    }
}

#[derive(Debug)]
pub enum HttpError {
    /// No connection, or it broke: worth retrying.
    Unreachable(String),
    /// The server answered something that is not usable HTTP.
    Protocol(String),
}

/// One request; returns the status and the body.
pub fn request(
    url: &HttpUrl,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Unreachable(format!("cannot resolve {}: {e}", url.host)))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    let mut s = stream.ok_or(HttpError::Unreachable(last))?;
    let io = |e: std::io::Error| HttpError::Unreachable(e.to_string());
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut req = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nAccept: */*\r\n",
        url.prefix
    );
    if let Some((ctype, b)) = body {
        req.push_str(&format!(
            "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some((_, b)) = body {
        bytes.extend_from_slice(b);
    }
    s.write_all(&bytes).map_err(io)?;
    // Read until the answer is complete (tangd keeps the connection open after it, whatever
    // `Connection: close` says), the peer closes, or the size cap is hit.
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    let started = std::time::Instant::now();
    loop {
        if started.elapsed() > TOTAL_TIMEOUT {
            return Err(HttpError::Unreachable(format!(
                "no complete answer within {} s",
                TOTAL_TIMEOUT.as_secs()
            )));
        }
        if let Some(len) = complete_length(&resp) {
            resp.truncate(len);
            break;
        }
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        resp.extend_from_slice(&buf[..n]);
        if resp.len() as u64 > MAX_RESPONSE {
            return Err(HttpError::Protocol(format!(
                "answer longer than {MAX_RESPONSE} bytes"
            )));
        }
    }
    parse_response(&resp)
}

/// The total length of the answer in `resp` once its headers and `Content-Length` bytes of
/// body have arrived.
fn complete_length(resp: &[u8]) -> Option<usize> {
    let end = resp.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&resp[..end]).ok()?;
    let len: usize = head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })?;
    let total = end.checked_add(len)?;
    (resp.len() >= total).then_some(total)
}

fn parse_response(resp: &[u8]) -> Result<(u16, Vec<u8>), HttpError> {
    let bad = |m: &str| HttpError::Protocol(m.to_owned());
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&resp[..end]).map_err(|_| bad("headers are not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad("not an HTTP/1.x answer"));
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let mut body = resp[end + 4..].to_vec();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                let n: usize = v.parse().map_err(|_| bad("bad Content-Length"))?;
                if n > body.len() {
                    return Err(HttpError::Unreachable(
                        "the connection closed before the whole answer arrived".into(),
                    ));
                }
                body.truncate(n);
            } else if k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity") {
                return Err(bad("chunked answers are not supported"));
            }
        }
    }
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why_not() {
        let u = HttpUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("127.0.0.1", 8080, "")
        );
        let u = HttpUrl::parse("http://tang.example/x/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.prefix.as_str()),
            ("tang.example", 80, "/x")
        );
        let u = HttpUrl::parse("http://[::1]:9").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        for bad in [
            "https://x",
            "http://",
            "http://a b",
            "http://u@h",
            "http://h:x",
            "ftp://h",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_parse_with_bounds() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
    }
}
