//! Fixed-newstyle option haggling, from the greeting to the first transmission byte.
//!
//! One option is read, answered in full, then the next: the stream stays in sync whatever the
//! peer sends, because every option's declared length is consumed exactly. Only input that cannot
//! be framed (bad magic, an option too long to drain, EOF) ends the connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::codec::{self, InfoRequest, Malformed};
use super::wire::*;
use super::ProtocolError;
use crate::block::Caps;
use crate::export::{Export, ExportTable, Lookup};
use crate::shutdown::Shutdown;

/// Options longer than MAX_OPTION_LENGTH but at most this are drained and refused with
/// ERR_TOO_BIG; anything longer ends the connection (draining it would be a free DoS).
const MAX_DRAINED_OPTION: u32 = 1024 * 1024;

/// What the handshake agreed, handed to the transmission session.
pub struct Negotiated {
    pub export: Arc<Export>,
    pub structured_replies: bool,
    /// base:allocation was selected for this export.
    pub base_allocation: bool,
    /// Transmission flags as sent to the client.
    pub transmission_flags: u16,
}

/// Transmission flags for an export; DF only once structured replies are on.
pub fn transmission_flags(caps: &Caps, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    f |= TFLAG_SEND_CACHE | TFLAG_SEND_WRITE_ZEROES;
    if caps.read_only {
        f |= TFLAG_READ_ONLY;
    }
    if caps.trim {
        f |= TFLAG_SEND_TRIM;
    }
    if caps.fast_zero {
        f |= TFLAG_SEND_FAST_ZERO;
    }
    if caps.rotational {
        f |= TFLAG_ROTATIONAL;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    f
}

/// Negotiated state built up option by option.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
struct Haggle {
    fixed_newstyle: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name (normalised) the last SET_META_CONTEXT selected base:allocation for.
    meta_selected_for: Option<String>,
}

impl Haggle {
    /// The state after a successful STARTTLS: nothing negotiated in plaintext survives
    /// (structured replies, meta contexts and the export they named; nbdkit CVE-2021-3716 was a
    /// MitM-injected STRUCTURED_REPLY kept across STARTTLS). Only the client flags stay: they
    /// were sent once, before any option, and cannot be sent again.
    fn after_starttls(&self) -> Haggle {
        Haggle {
            fixed_newstyle: self.fixed_newstyle,
            no_zeroes: self.no_zeroes,
            ..Haggle::default()
        }
    }
}

/// Where a connection is in the TLS dance, which decides how options are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// Plaintext; STARTTLS is refused with ERR_POLICY.
    Off,
    /// Plaintext; STARTTLS is accepted, other options are answered as usual.
    Offered,
    /// Plaintext; FORCEDTLS: only STARTTLS and ABORT, everything else ERR_TLS_REQD.
    Required,
    /// Inside TLS: STARTTLS again is ERR_INVALID.
    Established,
}

/// How option haggling ended.
pub enum Step {
    /// The client attached with GO or EXPORT_NAME.
    Go(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next on the bare stream, then
    /// [`negotiate_in_tls`] with this state.
    StartTls(AfterStartTls),
}

/// What survives STARTTLS (see `Haggle::after_starttls`), opaque to the caller.
pub struct AfterStartTls {
    st: Haggle,
    client_flags: u32,
}

/// Plaintext haggling without TLS (STARTTLS is refused with ERR_POLICY).
pub async fn negotiate<S>(
    stream: &mut S,
    exports: &ExportTable,
    shutdown: &Shutdown,
) -> Result<Negotiated, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match negotiate_plaintext(stream, exports, shutdown, TlsPhase::Off).await? {
        Step::Go(n) => Ok(n),
        // haggle() only returns StartTls when it is offered or required.
        Step::StartTls(_) => Err(ProtocolError::Aborted),
    }
}

/// Greeting, client flags and plaintext options, with STARTTLS handled as `phase` says
/// (`Off`, `Offered` or `Required`).
pub async fn negotiate_plaintext<S>(
    stream: &mut S,
    exports: &ExportTable,
    shutdown: &Shutdown,
    phase: TlsPhase,
) -> Result<Step, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(&codec::greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::BadClientFlags(client_flags));
    }
    let st = Haggle {
        fixed_newstyle: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        ..Haggle::default()
    };
    haggle(stream, exports, shutdown, st, client_flags, phase).await
}

/// Options inside TLS, after [`Step::StartTls`] and the TLS handshake, from the reset state.
pub async fn negotiate_in_tls<S>(
    stream: &mut S,
    exports: &ExportTable,
    shutdown: &Shutdown,
    after: AfterStartTls,
) -> Result<Negotiated, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let st = after.st.after_starttls();
    let phase = TlsPhase::Established;
    match haggle(stream, exports, shutdown, st, after.client_flags, phase).await? {
        Step::Go(n) => Ok(n),
        Step::StartTls(_) => Err(ProtocolError::Aborted),
    }
}

async fn haggle<S>(
    stream: &mut S,
    exports: &ExportTable,
    shutdown: &Shutdown,
    mut st: Haggle,
    client_flags: u32,
    phase: TlsPhase,
) -> Result<Step, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // One line per plaintext client under FORCEDTLS, at info: an operator who sees clients fail
    // needs to know they were refused for lack of TLS, not why each option was.
    let mut plaintext_logged = false;
    loop {
        let mut hdr = [0u8; codec::OPTION_HEADER_LEN];
        stream.read_exact(&mut hdr).await?;
        let opt = codec::decode_option_header(&hdr).map_err(ProtocolError::BadMagic)?;
        debug!(option = opt.option, length = opt.length, "option");

        if opt.length > MAX_OPTION_LENGTH {
            if opt.option == OPT_EXPORT_NAME
                || opt.length > MAX_DRAINED_OPTION
                || !st.fixed_newstyle
            {
                return Err(ProtocolError::OptionTooLong(opt.length));
            }
            drain(stream, u64::from(opt.length)).await?;
            reply_error(stream, opt.option, REP_ERR_TOO_BIG, "option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; opt.length as usize];
        stream.read_exact(&mut data).await?;

        if opt.option == OPT_EXPORT_NAME {
            if phase == TlsPhase::Required {
                // EXPORT_NAME cannot carry ERR_TLS_REQD: hang up (as nbdkit and qemu-nbd do).
                info!("refused a plaintext client (NBD_OPT_EXPORT_NAME): TLS is required");
                return Err(ProtocolError::TlsRequired);
            }
            return export_name(stream, exports, &st, data).await.map(Step::Go);
        }
        if !st.fixed_newstyle {
            // Such a client cannot read option replies; nbdkit likewise only honours EXPORT_NAME.
            return Err(ProtocolError::BadClientFlags(client_flags));
        }
        if phase == TlsPhase::Required && opt.option != OPT_STARTTLS && opt.option != OPT_ABORT {
            // FORCEDTLS: the payload is already consumed (the stream stays in sync) and no
            // state changes; nothing about the exports is revealed.
            let msg = "TLS is required on this listener: send NBD_OPT_STARTTLS first";
            if !plaintext_logged {
                plaintext_logged = true;
                info!(
                    option = opt.option,
                    "refused a plaintext client: TLS is required"
                );
            }
            reply_error(stream, opt.option, REP_ERR_TLS_REQD, msg).await?;
            continue;
        }
        if shutdown.is_triggered() && opt.option != OPT_ABORT {
            reply_error(
                stream,
                opt.option,
                REP_ERR_SHUTDOWN,
                "server is shutting down",
            )
            .await?;
            continue;
        }

        match opt.option {
            OPT_ABORT => {
                reply(stream, opt.option, REP_ACK, &[]).await?;
                return Err(ProtocolError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_error(stream, opt.option, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                let mut out = Vec::new();
                // A locked volume offers no export (INFO/GO then say it is locked).
                if exports.current().is_some() {
                    let server = codec::rep_server(exports.name(), exports.description());
                    codec::option_reply(&mut out, opt.option, REP_SERVER, &server);
                }
                codec::option_reply(&mut out, opt.option, REP_ACK, &[]);
                send(stream, &out).await?;
            }
            OPT_STARTTLS => match phase {
                TlsPhase::Off => {
                    let msg = "TLS is not enabled on this listener";
                    reply_error(stream, opt.option, REP_ERR_POLICY, msg).await?;
                }
                TlsPhase::Established => {
                    let msg = "TLS is already established";
                    reply_error(stream, opt.option, REP_ERR_INVALID, msg).await?;
                }
                TlsPhase::Offered | TlsPhase::Required => {
                    if !data.is_empty() {
                        let msg = "STARTTLS takes no data";
                        reply_error(stream, opt.option, REP_ERR_INVALID, msg).await?;
                    } else {
                        reply(stream, opt.option, REP_ACK, &[]).await?;
                        return Ok(Step::StartTls(AfterStartTls { st, client_flags }));
                    }
                }
            },
            OPT_INFO | OPT_GO => match codec::parse_info_request(&data) {
                Err(Malformed(why)) => {
                    reply_error(stream, opt.option, REP_ERR_INVALID, why).await?
                }
                Ok(req) => {
                    if let Some(export) = info(stream, exports, &st, opt.option, &req).await? {
                        if opt.option == OPT_GO {
                            return Ok(Step::Go(finish(export, &st, &req.name, exports)));
                        }
                    }
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let msg = "STRUCTURED_REPLY takes no data";
                    reply_error(stream, opt.option, REP_ERR_INVALID, msg).await?;
                } else {
                    st.structured = true;
                    reply(stream, opt.option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(stream, exports, &mut st, opt.option, &data).await?;
            }
            OPT_EXTENDED_HEADERS => {
                let msg = "extended headers are not supported";
                reply_error(stream, opt.option, REP_ERR_UNSUP, msg).await?;
            }
            other => {
                let msg = format!("option {other} is not supported");
                reply_error(stream, other, REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

async fn export_name<S>(
    stream: &mut S,
    exports: &ExportTable,
    st: &Haggle,
    data: Vec<u8>,
) -> Result<Negotiated, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = String::from_utf8_lossy(&data).into_owned();
    let export = match exports.lookup(&name) {
        Lookup::Ready(e) => e,
        // EXPORT_NAME cannot carry an error: the only answer is to hang up.
        Lookup::Locked | Lookup::Unknown => return Err(ProtocolError::NoSuchExport(name)),
    };
    let flags = transmission_flags(&export.device.caps(), false);
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&export.device.size().to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !st.no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    send(stream, &out).await?;
    Ok(Negotiated {
        export,
        structured_replies: false,
        base_allocation: false,
        transmission_flags: flags,
    })
}

/// Answer INFO or GO. Returns the export when the final reply was ACK.
async fn info<S>(
    stream: &mut S,
    exports: &ExportTable,
    st: &Haggle,
    option: u32,
    req: &InfoRequest,
) -> Result<Option<Arc<Export>>, ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let export = match exports.lookup(&req.name) {
        Lookup::Ready(e) => e,
        Lookup::Locked => {
            let msg = format!(
                "export {:?} is locked: unlock the volume with `nbdcryptctl unlock`",
                exports.name()
            );
            reply_error(stream, option, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        }
        Lookup::Unknown => {
            let msg = format!(
                "no export named {:?} (this server offers {:?})",
                req.name,
                exports.name()
            );
            reply_error(stream, option, REP_ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        }
    };
    let caps = export.device.caps();
    let mut out = Vec::new();
    let flags = transmission_flags(&caps, st.structured);
    codec::option_reply(
        &mut out,
        option,
        REP_INFO,
        &codec::info_export(export.device.size(), flags),
    );
    // Block sizes are always sent: harmless to clients that did not ask, and INFO == GO.
    let sizes = codec::info_block_size(caps.min_block, caps.preferred_block, MAX_PAYLOAD);
    codec::option_reply(&mut out, option, REP_INFO, &sizes);
    if req.requests.contains(&INFO_NAME) {
        codec::option_reply(
            &mut out,
            option,
            REP_INFO,
            &codec::info_string(INFO_NAME, &export.name),
        );
    }
    if req.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        let d = codec::info_string(INFO_DESCRIPTION, &export.description);
        codec::option_reply(&mut out, option, REP_INFO, &d);
    }
    codec::option_reply(&mut out, option, REP_ACK, &[]);
    send(stream, &out).await?;
    Ok(Some(export))
}

fn finish(export: Arc<Export>, st: &Haggle, name: &str, exports: &ExportTable) -> Negotiated {
    let flags = transmission_flags(&export.device.caps(), st.structured);
    let normalised = normalise(name, exports);
    let base_allocation = st.structured && st.meta_selected_for.as_deref() == Some(normalised);
    Negotiated {
        export,
        structured_replies: st.structured,
        base_allocation,
        transmission_flags: flags,
    }
}

fn normalise<'a>(name: &'a str, exports: &'a ExportTable) -> &'a str {
    if name.is_empty() {
        exports.name()
    } else {
        name
    }
}

async fn meta_context<S>(
    stream: &mut S,
    exports: &ExportTable,
    st: &mut Haggle,
    option: u32,
    data: &[u8],
) -> Result<(), ProtocolError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // Each SET replaces the previous selection, even when it fails.
        st.meta_selected_for = None;
    }
    if !st.structured {
        let msg = "negotiate structured replies before meta contexts";
        return reply_error(stream, option, REP_ERR_INVALID, msg).await;
    }
    let req = match codec::parse_meta_context_request(data) {
        Ok(r) => r,
        Err(Malformed(why)) => return reply_error(stream, option, REP_ERR_INVALID, why).await,
    };
    if let Lookup::Unknown = exports.lookup(&req.export) {
        let msg = format!("no export named {:?}", req.export);
        return reply_error(stream, option, REP_ERR_UNKNOWN, &msg).await;
    }
    let mut matches = false;
    for q in &req.queries {
        if !q.contains(':') {
            let msg = format!("meta context query {q:?} has no namespace");
            return reply_error(stream, option, REP_ERR_INVALID, &msg).await;
        }
        // LIST accepts "base:" (all of base); SET needs the exact name.
        if q == META_BASE_ALLOCATION || (!set && q == "base:") {
            matches = true;
        }
    }
    if !set && req.queries.is_empty() {
        matches = true;
    }
    let mut out = Vec::new();
    if matches {
        let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
        let ctx = codec::rep_meta_context(id, META_BASE_ALLOCATION);
        codec::option_reply(&mut out, option, REP_META_CONTEXT, &ctx);
        if set {
            st.meta_selected_for = Some(normalise(&req.export, exports).to_owned());
        }
    }
    codec::option_reply(&mut out, option, REP_ACK, &[]);
    send(stream, &out).await
}

async fn reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> Result<(), ProtocolError> {
    let mut out = Vec::new();
    codec::option_reply(&mut out, option, kind, data);
    send(stream, &out).await
}

async fn reply_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    option: u32,
    kind: u32,
    message: &str,
) -> Result<(), ProtocolError> {
    debug!(option, error = kind, message, "option refused");
    reply(stream, option, kind, message.as_bytes()).await
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), ProtocolError> {
    stream.write_all(bytes).await?;
    stream.flush().await?;
    Ok(())
}

/// Read and discard `n` bytes through a small fixed buffer.
pub(crate) async fn drain<S: AsyncRead + Unpin>(stream: &mut S, mut n: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let want = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
        stream.read_exact(&mut buf[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starttls_resets_everything_negotiated_in_plaintext_but_the_client_flags() {
        let before = Haggle {
            fixed_newstyle: true,
            no_zeroes: true,
            structured: true,
            meta_selected_for: Some("nbdcrypt".into()),
        };
        let after = before.after_starttls();
        assert_eq!(
            after,
            Haggle {
                fixed_newstyle: true,
                no_zeroes: true,
                ..Haggle::default()
            }
        );
    }
}
