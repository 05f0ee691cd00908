//! Handshake phase on the wire, with a hand-written client (no libnbd): option replies, error
//! values, stream sync after bad options, and that one bad client never affects another.

use nbdcrypt_tests::raw::*;
use nbdcrypt_tests::*;
use std::time::Duration;

const SIZE: u64 = 8 * MIB;

fn daemon() -> Daemon {
    Daemon::plain(SIZE, &[])
}

#[test]
fn the_greeting_offers_fixed_newstyle_and_no_zeroes() {
    let d = daemon();
    let c = Client::connect_no_flags(&d.sock);
    assert_eq!(c.server_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

#[test]
fn an_unknown_option_gets_err_unsup_and_then_list_still_works() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let (r, before) = c.option(0x4242, b"some option data");
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(r.typ, REP_ERR_UNSUP, "{r:?}");
    // The withdrawn PEEK_EXPORT (4) is unknown too.
    let (r, _) = c.option(4, &[]);
    assert_eq!(r.typ, REP_ERR_UNSUP, "{r:?}");
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
    c.go(EXPORT);
    c.read(1, 0, 512).expect("read after GO");
}

#[test]
fn info_whose_name_length_overruns_the_option_gets_err_invalid_and_the_stream_stays_in_sync() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    // Name length 100, but the option holds only 4 + 8 + 2 bytes.
    let mut data = 100u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"nbdcrypt");
    data.extend_from_slice(&0u16.to_be_bytes());
    let (r, before) = c.option(OPT_INFO, &data);
    assert!(
        before.is_empty(),
        "no INFO replies before the error: {before:?}"
    );
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
}

#[test]
fn go_whose_info_count_overruns_the_option_gets_err_invalid_and_the_stream_stays_in_sync() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    // Says 5 info requests but carries 1.
    let mut data = info_payload(EXPORT, &[INFO_BLOCK_SIZE]);
    let k = data.len() - 4;
    data[k..k + 2].copy_from_slice(&5u16.to_be_bytes());
    let (r, _) = c.option(OPT_GO, &data);
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    // An option shorter than its fixed fields is malformed too.
    let (r, _) = c.option(OPT_INFO, &[0, 0]);
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
    c.go(EXPORT);
}

#[test]
fn list_with_data_gets_exactly_one_err_invalid_and_the_next_list_works() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let (r, before) = c.option(OPT_LIST, b"junk!");
    assert!(
        before.is_empty(),
        "LIST with data must not list: {before:?}"
    );
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    // If the server had also sent the list and an ACK (nbd-server's bug), this LIST would read
    // the stale replies.
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
}

#[test]
fn starttls_gets_err_policy_and_the_handshake_goes_on() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let (r, _) = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r.typ, REP_ERR_POLICY, "{r:?}");
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
    c.go(EXPORT);
    c.read(1, 0, 4096).expect("read after a refused STARTTLS");
}

#[test]
fn extended_headers_gets_err_unsup_and_compact_requests_keep_working() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let (r, _) = c.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r.typ, REP_ERR_UNSUP, "{r:?}");
    assert_eq!(c.structured_reply(), REP_ACK);
    let e = c.go(EXPORT);
    assert_eq!(e.size, SIZE);
    // Structured reply to a compact READ request.
    c.request(0, CMD_READ, 9, 0, 4096, &[]).unwrap();
    let mut got = 0usize;
    loop {
        let (flags, typ, cookie, payload) = c.chunk().expect("structured READ reply");
        assert_eq!(cookie, 9);
        match typ {
            CHUNK_OFFSET_DATA => got += payload.len() - 8,
            CHUNK_OFFSET_HOLE => got += be32(&payload[8..]) as usize,
            CHUNK_NONE => {}
            t => panic!("unexpected chunk type {t:#x}: {payload:?}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(got, 4096);
}

#[test]
fn a_huge_option_length_is_refused_without_waiting_for_the_data_and_others_are_served() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    c.send_opt_header(OPT_GO, 100_000_000).unwrap();
    // The server may already have closed: a failed send is fine.
    let _ = c.send(&info_payload(EXPORT, &[]));
    // Either ERR_TOO_BIG (or ERR_INVALID) right away, or a hard disconnect: never a 100 MB buffer
    // that waits to be filled.
    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match c.read_opt_reply() {
        Ok(r) => assert!(
            r.typ == REP_ERR_TOO_BIG || r.typ == REP_ERR_INVALID,
            "a 100 MB option must be refused, got {r:?}"
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "server neither answered nor closed within 5 s after a 100 MB option header \
             (is it waiting for / allocating 100 MB?)"
        ),
    }
    assert_server_serves(&d.sock);
}

#[test]
fn export_name_without_no_zeroes_sends_134_bytes_and_transmission_follows() {
    let d = daemon();
    let mut c = Client::connect_with(&d.sock, C_FIXED_NEWSTYLE);
    c.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
    let r = c.read_n(134).expect("134 bytes after EXPORT_NAME");
    assert_eq!(be64(&r), SIZE);
    let flags = be16(&r[8..]);
    assert_ne!(flags & TF_HAS_FLAGS, 0);
    assert!(r[10..].iter().all(|&b| b == 0), "124 bytes of zero padding");
    let data = c.read(5, 0, 4096).expect("READ right after the padding");
    assert_eq!(data, vec![0; 4096]);
}

#[test]
fn export_name_with_no_zeroes_sends_10_bytes_and_transmission_follows() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    c.send_opt(OPT_EXPORT_NAME, b"").unwrap(); // "" = the default export
    let r = c.read_n(10).expect("10 bytes after EXPORT_NAME");
    assert_eq!(be64(&r), SIZE);
    let flags = be16(&r[8..]);
    assert_ne!(flags & TF_HAS_FLAGS, 0);
    assert_eq!(flags & TF_SEND_DF, 0, "SEND_DF without structured replies");
    // If the server padded anyway, this reply would start with zeroes instead of the magic.
    assert_eq!(c.write(6, 4096, &[0x42; 512], 0), 0);
    assert_eq!(c.read(7, 4096, 512).unwrap(), vec![0x42; 512]);
    drop(c);
    assert_eq!(read_at(&d.image, 4096, 512), vec![0x42; 512]);
}

#[test]
fn export_name_for_an_unknown_export_closes_that_connection_only() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    c.send_opt(OPT_EXPORT_NAME, b"no-such-export").unwrap();
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "unservable EXPORT_NAME must hard-disconnect"
    );
    assert_server_serves(&d.sock);
}

#[test]
fn abort_is_acknowledged() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    // Data on ABORT is to be ignored.
    let (r, _) = c.option(OPT_ABORT, b"ignored");
    assert_eq!(r.typ, REP_ACK, "{r:?}");
    drop(c);
    assert_server_serves(&d.sock);
}

#[test]
fn unknown_client_flags_drop_the_connection() {
    let d = daemon();
    let mut c = Client::connect_with(&d.sock, C_FIXED_NEWSTYLE | 0x100);
    // Sending an option may already fail if the server closed first.
    let _ = c.send_opt(OPT_LIST, &[]);
    match c.read_opt_reply() {
        Ok(r) => panic!("server answered an option after unknown client flags: {r:?}"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "server neither closed nor answered: {e}"
        ),
    }
    assert_server_serves(&d.sock);
}

#[test]
fn go_answers_block_size_name_and_description_and_info_matches_go() {
    let d = Daemon::plain(SIZE, &["--name", "vol0", "--description", "raw test"]);
    let mut c = Client::connect(&d.sock);
    let want = [INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION];
    let (r, info_replies) = c.option(OPT_INFO, &info_payload("vol0", &want));
    assert_eq!(r.typ, REP_ACK, "{r:?}");
    let (r, go_replies) = c.option(OPT_GO, &info_payload("vol0", &want));
    assert_eq!(r.typ, REP_ACK, "{r:?}");

    let by_type = |v: &[OptReply], t: u16| -> Option<Vec<u8>> {
        v.iter()
            .find(|r| r.typ == REP_INFO && be16(&r.data) == t)
            .map(|r| r.data[2..].to_vec())
    };
    for (what, replies) in [("INFO", &info_replies), ("GO", &go_replies)] {
        let e = export_from_infos(replies).unwrap_or_else(|| panic!("{what} without INFO_EXPORT"));
        assert_eq!(e.size, SIZE, "{what} size");
        let bs = by_type(replies, INFO_BLOCK_SIZE)
            .unwrap_or_else(|| panic!("{what} without INFO_BLOCK_SIZE"));
        assert_eq!(bs.len(), 12, "{what} INFO_BLOCK_SIZE length");
        assert_eq!(
            (be32(&bs), be32(&bs[4..]), be32(&bs[8..])),
            (1, 4096, 32 << 20),
            "{what} block sizes"
        );
        if let Some(desc) = by_type(replies, INFO_DESCRIPTION) {
            assert_eq!(desc, b"raw test", "{what} description");
        } else {
            panic!("{what} without INFO_DESCRIPTION although asked and configured");
        }
        if let Some(name) = by_type(replies, INFO_NAME) {
            assert_eq!(name, b"vol0", "{what} name");
        }
    }
    assert_eq!(
        export_from_infos(&info_replies),
        export_from_infos(&go_replies),
        "INFO and GO must agree"
    );
    c.read(1, SIZE - 512, 512)
        .expect("read the last sector after GO");
}

#[test]
fn go_for_an_unknown_export_gets_err_unknown_and_the_handshake_goes_on() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let (r, before) = c.option(OPT_GO, &info_payload("nope", &[]));
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(r.typ, REP_ERR_UNKNOWN, "{r:?}");
    let (r, _) = c.option(OPT_INFO, &info_payload("nope", &[]));
    assert_eq!(r.typ, REP_ERR_UNKNOWN, "{r:?}");
    let e = c.go("");
    assert_eq!(e.size, SIZE);
}

#[test]
fn meta_context_options_need_structured_replies_and_then_offer_base_allocation() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    let q = meta_payload(EXPORT, &["base:allocation"]);
    let (r, before) = c.option(OPT_SET_META_CONTEXT, &q);
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(
        r.typ, REP_ERR_INVALID,
        "SET_META_CONTEXT before structured replies: {r:?}"
    );

    // STRUCTURED_REPLY with data is malformed.
    let (r, _) = c.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    assert_eq!(c.structured_reply(), REP_ACK);

    let (r, listed) = c.option(OPT_LIST_META_CONTEXT, &meta_payload(EXPORT, &[]));
    assert_eq!(r.typ, REP_ACK, "{r:?}");
    let names: Vec<String> = listed
        .iter()
        .map(|r| String::from_utf8_lossy(&r.data[4..]).into_owned())
        .collect();
    assert!(names.contains(&"base:allocation".to_string()), "{names:?}");

    // Unknown namespaces are ignored, base:allocation is selected with a usable id.
    let (r, set) = c.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["x-nosuch:thing", "base:allocation"]),
    );
    assert_eq!(r.typ, REP_ACK, "{r:?}");
    assert_eq!(set.len(), 1, "exactly base:allocation selected: {set:?}");
    assert_eq!(set[0].typ, REP_META_CONTEXT);
    assert_eq!(&set[0].data[4..], b"base:allocation");
    let id = be32(&set[0].data);
    c.go(EXPORT);

    c.request(0, CMD_BLOCK_STATUS, 3, 0, 65536, &[]).unwrap();
    let (flags, typ, cookie, payload) = c.chunk().expect("BLOCK_STATUS chunk");
    assert_eq!((typ, cookie), (CHUNK_BLOCK_STATUS, 3), "{payload:?}");
    assert_eq!(be32(&payload), id, "context id of the status chunk");
    assert!(
        payload.len() >= 12 && (payload.len() - 4) % 8 == 0,
        "{payload:?}"
    );
    assert_ne!(be32(&payload[4..]), 0, "zero-length extent");
    if flags & REPLY_FLAG_DONE == 0 {
        let (flags, typ, cookie, _) = c.chunk().unwrap();
        assert_eq!(
            (flags & REPLY_FLAG_DONE, typ, cookie),
            (REPLY_FLAG_DONE, CHUNK_NONE, 3)
        );
    }
}

#[test]
fn block_status_without_a_selected_context_is_einval_in_a_structured_reply() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    c.go(EXPORT);
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 4096, &[]).unwrap();
    let (flags, typ, cookie, payload) = c.chunk().expect("structured error for BLOCK_STATUS");
    assert_eq!(cookie, 4);
    assert!(
        typ == CHUNK_ERROR || typ == CHUNK_ERROR_OFFSET,
        "expected an error chunk, got {typ:#x}"
    );
    assert_eq!(be32(&payload), EINVAL);
    if flags & REPLY_FLAG_DONE == 0 {
        let (flags, _, _, _) = c.chunk().unwrap();
        assert_ne!(flags & REPLY_FLAG_DONE, 0);
    }
    c.request(0, CMD_FLUSH, 5, 0, 0, &[]).unwrap();
    // FLUSH may be answered simply or structured; accept either, but it must succeed.
    let h = c.read_n(4).unwrap();
    match be32(&h) {
        SIMPLE_REPLY_MAGIC => {
            let rest = c.read_n(12).unwrap();
            assert_eq!((be32(&rest), be64(&rest[4..])), (0, 5));
        }
        STRUCTURED_REPLY_MAGIC => {
            let rest = c.read_n(16).unwrap();
            assert_eq!(be16(&rest[2..]), CHUNK_NONE);
            assert_eq!(be64(&rest[4..]), 5);
        }
        m => panic!("bad reply magic {m:#x}"),
    }
}

#[test]
fn a_client_that_stalls_in_the_handshake_is_dropped_after_the_handshake_timeout() {
    let d = Daemon::plain(SIZE, &["--handshake-timeout", "1"]);
    let mut idle = Client::connect(&d.sock);
    let mut silent = Client::connect_no_flags(&d.sock);
    assert!(
        idle.closed_within(Duration::from_secs(6)),
        "idle client still connected after 6 s"
    );
    assert!(
        silent.closed_within(Duration::from_secs(3)),
        "silent client still connected"
    );
    assert_server_serves(&d.sock);
}

#[test]
fn garbage_instead_of_client_flags_or_options_closes_that_connection_only() {
    let d = daemon();
    let mut c = Client::connect_no_flags(&d.sock);
    let _ = c.send(&random_bytes(9, 4096));
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "garbage handshake must be dropped"
    );

    let mut c = Client::connect(&d.sock);
    let _ = c.send(&random_bytes(10, 4096));
    assert!(
        c.closed_within(Duration::from_secs(5)),
        "garbage instead of an option must be dropped"
    );

    // EOF in the middle of an option.
    let mut c = Client::connect(&d.sock);
    c.send_opt_header(OPT_GO, 100).unwrap();
    c.send(b"partial").unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert_server_serves(&d.sock);
}

#[test]
fn set_meta_context_replaces_the_previous_selection_and_binds_to_the_export_name() {
    let d = daemon();
    let block_status_error = |c: &mut Client, cookie: u64| -> u32 {
        c.request(0, CMD_BLOCK_STATUS, cookie, 0, 4096, &[])
            .unwrap();
        let mut err = 0;
        loop {
            let (flags, typ, got, payload) = c.chunk().expect("BLOCK_STATUS reply");
            assert_eq!(got, cookie);
            if typ & 0x8000 != 0 {
                err = be32(&payload);
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return err;
            }
        }
    };

    // A later SET with no queries replaces the earlier selection with nothing.
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let (r, set) = c.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["base:allocation"]),
    );
    assert_eq!((r.typ, set.len()), (REP_ACK, 1), "{set:?}");
    let (r, set) = c.option(OPT_SET_META_CONTEXT, &meta_payload(EXPORT, &[]));
    assert_eq!(
        (r.typ, set.len()),
        (REP_ACK, 0),
        "SET with no queries selects nothing: {set:?}"
    );
    c.go(EXPORT);
    assert_eq!(
        block_status_error(&mut c, 1),
        EINVAL,
        "selection was not replaced"
    );

    // A selection made for another export name does not carry over to GO.
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let (r, _) = c.option(
        OPT_SET_META_CONTEXT,
        &meta_payload("other", &["base:allocation"]),
    );
    assert!(r.typ == REP_ACK || r.typ == REP_ERR_UNKNOWN, "{r:?}");
    c.go(EXPORT);
    assert_eq!(
        block_status_error(&mut c, 2),
        EINVAL,
        "meta context for another export applied"
    );

    // And the normal case works on the same server.
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let (r, _) = c.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["base:allocation"]),
    );
    assert_eq!(r.typ, REP_ACK);
    c.go(EXPORT);
    assert_eq!(block_status_error(&mut c, 3), 0);
}

#[test]
fn structured_reply_twice_is_ack_or_err_invalid_and_not_a_disconnect() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let again = c.structured_reply();
    assert!(
        again == REP_ACK || again == REP_ERR_INVALID,
        "second STRUCTURED_REPLY: {again:#x}"
    );
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
}

#[test]
fn a_client_without_fixed_newstyle_can_still_use_export_name() {
    let d = daemon();
    let mut c = Client::connect_with(&d.sock, 0);
    c.send_opt(OPT_EXPORT_NAME, EXPORT.as_bytes()).unwrap();
    let r = c
        .read_n(134)
        .expect("134 bytes after EXPORT_NAME (no NO_ZEROES)");
    assert_eq!(be64(&r), SIZE);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(c.read(1, 0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn a_meta_context_query_overrunning_the_option_gets_err_invalid_and_the_stream_stays_in_sync() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    assert_eq!(c.structured_reply(), REP_ACK);
    let mut q = meta_payload(EXPORT, &["base:allocation"]);
    // The query claims 200 bytes but carries 15.
    let at = q.len() - "base:allocation".len() - 4;
    q[at..at + 4].copy_from_slice(&200u32.to_be_bytes());
    for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
        let (r, before) = c.option(opt, &q);
        assert!(before.is_empty(), "option {opt}: {before:?}");
        assert_eq!(r.typ, REP_ERR_INVALID, "option {opt}: {r:?}");
    }
    // A query count larger than the data.
    let mut q = meta_payload(EXPORT, &[]);
    let n = q.len() - 4;
    q[n..].copy_from_slice(&3u32.to_be_bytes());
    let (r, _) = c.option(OPT_LIST_META_CONTEXT, &q);
    assert_eq!(r.typ, REP_ERR_INVALID, "{r:?}");
    assert_eq!(c.list(), vec![EXPORT.to_string()]);
    let (r, set) = c.option(
        OPT_SET_META_CONTEXT,
        &meta_payload(EXPORT, &["base:allocation"]),
    );
    assert_eq!((r.typ, set.len()), (REP_ACK, 1));
    c.go(EXPORT);
}

#[test]
fn a_thousand_options_in_a_row_are_all_answered() {
    let d = daemon();
    let mut c = Client::connect(&d.sock);
    for i in 0..1000u32 {
        let (r, _) = c.option(1000 + i, &i.to_be_bytes());
        assert_eq!(r.typ, REP_ERR_UNSUP, "option {i}: {r:?}");
    }
    c.go(EXPORT);
    c.read(1, 0, 512).unwrap();
}
