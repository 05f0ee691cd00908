//! `metrics_http`: bytes an HTTP peer sends to `nbdcryptd --metrics`, through the real
//! responder on a Unix socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// Every answer is one well-framed HTTP/1.1 response whose Content-Length is its body's, and
/// the metrics text is only ever served to a GET of /metrics.
pub fn http(data: &[u8]) {
    let data = &data[..data.len().min(16 * 1024)];
    let Ok((mut peer, ours)) = UnixStream::pair() else { return };
    let source: nbdcrypt::metrics::http::Source = Arc::new(|| "nbdcrypt_test 1\n".to_owned());
    let server = std::thread::spawn(move || {
        let _ = nbdcrypt::metrics::http::serve_stream(ours, &source);
    });
    let _ = peer.write_all(data);
    let _ = peer.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = peer.read_to_end(&mut out);
    let _ = server.join();
    if out.is_empty() {
        return; // the peer ended before a whole head: closed without an answer
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("Content-Length");
    assert_eq!(len, body.len(), "{text}");
    if body.contains("nbdcrypt_test") {
        assert!(data.starts_with(b"GET /metrics"), "metrics served to {data:?}");
    }
}
