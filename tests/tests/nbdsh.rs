//! nbdsh (libnbd's Python binding) scripts: option mode, structured reads, block status,
//! zero/trim/cache, error values. Each script asserts in Python; a failed assertion makes nbdsh
//! exit non-zero and the test prints the traceback.
//!
//! `h.set_strict_mode(0)` turns off libnbd's client-side checks where the test wants the
//! *server's* answer to a request a careful client would not send.

use nbdcrypt_tests::*;

#[track_caller]
fn ok(out: Out) {
    out.success();
}

#[test]
fn option_mode_lists_the_export_gets_info_lists_meta_contexts_and_goes() {
    let d = Daemon::plain(16 * MIB, &["--description", "nbdsh test"]);
    ok(nbdsh_d(
        &d,
        r#"
        h.set_opt_mode(True)
        h.connect_uri(URI)
        assert h.aio_is_negotiating(), "opt mode must stop in negotiation"

        names = []
        n = h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
        assert names == [("nbdcrypt", "nbdsh test")], names

        h.set_export_name("nbdcrypt")
        h.opt_info()
        assert h.get_size() == 16 * 1024 * 1024, h.get_size()
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * 1024 * 1024
        assert h.can_flush() and h.can_fua() and h.can_multi_conn() and h.can_zero()
        assert not h.can_trim() and not h.is_read_only()

        ctx = []
        h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
        assert "base:allocation" in ctx, ctx

        h.set_export_name("no-such-export")
        # NBD_REP_ERR_UNKNOWN, which libnbd reports as ENOENT.
        expect_err(h.opt_info, errno.ENOENT, "opt_info for an unknown export")

        # INFO for the empty (default) name describes the same export.
        h.set_export_name("")
        h.opt_info()
        assert h.get_size() == 16 * 1024 * 1024

        h.set_export_name("nbdcrypt")
        h.opt_go()
        assert h.aio_is_ready()
        assert h.pread(4096, 0) == bytes(4096)
        h.shutdown()
    "#,
    ));
}

#[test]
fn structured_reads_with_df_return_the_data_in_one_chunk() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        assert h.get_structured_replies_negotiated()
        assert h.can_df()
        data = os.urandom(65536)
        h.pwrite(data, 1 * 1024 * 1024)

        for off, want in ((1 * 1024 * 1024, data), (8 * 1024 * 1024, bytes(65536))):
            chunks = []
            def cb(subbuf, offset, status, error):
                chunks.append((offset, len(subbuf), status))
                return 0
            buf = h.pread_structured(65536, off, cb, nbd.CMD_FLAG_DF)
            assert buf == want, "DF read at %d returned wrong data" % off
            assert len(chunks) == 1, "DF allows one content chunk, got %r" % chunks
            assert chunks[0] == (off, 65536, nbd.READ_DATA), chunks

        # Without DF, a read over data + hole must still be covered exactly, chunk by chunk.
        chunks = []
        def cb2(subbuf, offset, status, error):
            chunks.append((offset, len(subbuf), status))
            return 0
        start = 1 * 1024 * 1024 - 4096
        buf = h.pread_structured(262144, start, cb2)
        assert buf[:4096] == bytes(4096) and buf[4096:4096 + 65536] == data, "structured read content"
        assert buf[4096 + 65536:] == bytes(262144 - 4096 - 65536)
        covered = sorted((o, o + n) for o, n, s in chunks)
        pos = start
        for a, b in covered:
            assert a == pos, "chunks overlap or leave a gap: %r" % chunks
            pos = b
        assert pos == start + 262144, "chunks do not cover the read: %r" % chunks
        assert all(s in (nbd.READ_DATA, nbd.READ_HOLE) for o, n, s in chunks), chunks
    "#,
    ));
}

#[test]
fn block_status_reports_data_and_holes_with_and_without_req_one() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        h.add_meta_context("base:allocation")
        h.connect_uri(URI)
        assert h.can_meta_context("base:allocation")
        h.pwrite(os.urandom(M), 4 * M)
        h.flush()

        def status(count, offset, flags=0):
            got = []
            def cb(ctx, off, entries, err):
                got.append((ctx, off, list(entries)))
                return 0
            h.block_status(count, offset, cb, flags)
            assert len(got) == 1, "one status chunk per selected context, got %r" % got
            ctx, off, entries = got[0]
            assert ctx == "base:allocation" and off == offset, got
            assert len(entries) >= 2 and len(entries) % 2 == 0, entries
            pairs = list(zip(entries[0::2], entries[1::2]))
            assert all(l > 0 for l, f in pairs), "zero-length extent: %r" % pairs
            assert all(f & ~3 == 0 for l, f in pairs), "only HOLE|ZERO bits allowed: %r" % pairs
            return pairs

        # Without REQ_ONE: all extents but the last lie within the request.
        pairs = status(16 * M, 0)
        assert sum(l for l, f in pairs[:-1]) < 16 * M, pairs
        def flags_at(pairs, start, o):
            pos = start
            for l, f in pairs:
                if pos <= o < pos + l:
                    return f
                pos += l
            return None
        assert flags_at(pairs, 0, 0) == 3, "start of the file is a hole: %r" % pairs
        f = flags_at(pairs, 0, 4 * M)
        assert f is not None and f & 1 == 0, "written data reported as hole: %r" % pairs

        # With REQ_ONE: exactly one extent, no longer than the request.
        for off, cnt, want_hole in ((0, 16 * M, True), (4 * M, M, False), (4 * M + 4096, 4096, False), (12 * M, 65536, True)):
            pairs = status(cnt, off, nbd.CMD_FLAG_REQ_ONE)
            assert len(pairs) == 1, "REQ_ONE must give one extent: %r" % pairs
            l, f = pairs[0]
            assert 0 < l <= cnt, "REQ_ONE extent longer than the request: %r" % pairs
            assert (f & 1 == 1) == want_hole, "offset %d flags %r" % (off, pairs)

        # Range past the end is an error from the server.
        h.set_strict_mode(0)
        def past_end():
            h.block_status(4096, 16 * M, lambda *a: 0)
        expect_err(past_end, errno.EINVAL, "block status past the end")
        assert h.pread(4096, 0) == bytes(4096)
    "#,
    ));
}

#[test]
fn write_zeroes_zeroes_the_range_with_fast_zero_and_with_no_hole() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        h.connect_uri(URI)
        assert h.can_zero() and h.can_fast_zero()
        ones = b"\xff" * M

        h.pwrite(ones, 0)
        h.zero(M, 0)
        assert h.pread(M, 0) == bytes(M), "zero without flags"

        h.pwrite(ones, M)
        h.zero(M, M, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(M, M) == bytes(M), "zero with FAST_ZERO on a plain file must succeed"

        h.pwrite(ones, 2 * M, nbd.CMD_FLAG_FUA)
        os.sync()
        blocks_before = os.stat(IMAGE).st_blocks
        h.zero(M, 2 * M, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
        assert h.pread(M, 2 * M) == bytes(M), "zero with NO_HOLE"
        os.sync()
        blocks_after = os.stat(IMAGE).st_blocks
        assert blocks_after >= blocks_before, "NO_HOLE punched a hole: %d -> %d blocks" % (blocks_before, blocks_after)

        # Unaligned zero leaves the neighbours alone.
        h.pwrite(ones, 4 * M)
        h.zero(3333, 4 * M + 1000)
        got = h.pread(8192, 4 * M)
        assert got == b"\xff" * 1000 + bytes(3333) + b"\xff" * (8192 - 4333), "unaligned zero"

        # The backing file agrees.
        with open(IMAGE, "rb") as f:
            f.seek(0); assert f.read(3 * M) == bytes(3 * M)
            f.seek(4 * M); assert f.read(8192) == got

        # Zero past the end -> ENOSPC from the server.
        h.set_strict_mode(0)
        expect_err(lambda: h.zero(8192, 16 * M - 4096), errno.ENOSPC, "zero crossing the end")
        assert h.pread(4096, 16 * M - 4096) == bytes(4096)
    "#,
    ));
}

#[test]
fn trim_with_allow_discards_leaves_the_range_zero_or_a_hole() {
    let d = Daemon::plain(16 * MIB, &["--allow-discards"]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        h.add_meta_context("base:allocation")
        h.connect_uri(URI)
        assert h.can_trim()
        h.pwrite(b"\xee" * (4 * M), 0, nbd.CMD_FLAG_FUA)
        h.trim(2 * M, M)
        h.flush()
        got = h.pread(2 * M, M)
        holes = []
        def cb(ctx, off, entries, err):
            holes.extend(zip(entries[0::2], entries[1::2]))
            return 0
        h.block_status(2 * M, M, cb, nbd.CMD_FLAG_REQ_ONE)
        is_hole = holes and holes[0][1] & 1 == 1
        assert got == bytes(2 * M) or is_hole, "trimmed range neither reads zero nor is a hole: %r" % holes
        # Outside the trimmed range nothing changed.
        assert h.pread(M, 0) == b"\xee" * M
        assert h.pread(M, 3 * M) == b"\xee" * M
        h.trim(M, 3 * M, nbd.CMD_FLAG_FUA)
        h.set_strict_mode(0)
        expect_err(lambda: h.trim(8192, 16 * M - 4096), errno.EINVAL, "trim past the end")
    "#,
    ));
}

#[test]
fn trim_without_allow_discards_is_refused_and_changes_nothing() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        h.connect_uri(URI)
        assert not h.can_trim()
        h.pwrite(b"\xee" * M, 0, nbd.CMD_FLAG_FUA)
        # libnbd itself refuses a command the server did not advertise...
        expect_err(lambda: h.trim(M, 0), errno.EINVAL, "libnbd trim without SEND_TRIM")
        # ...and with client checks off the server must refuse it too.
        h.set_strict_mode(0)
        expect_err(lambda: h.trim(M, 0), errno.EINVAL, "server trim without SEND_TRIM")
        assert h.pread(M, 0) == b"\xee" * M, "unadvertised trim changed data"
    "#,
    ));
    assert_eq!(read_at(&d.image, 0, MIB as usize), vec![0xee; MIB as usize]);
}

#[test]
fn cache_succeeds_in_range_and_is_einval_past_the_end() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        h.connect_uri(URI)
        assert h.can_cache()
        h.cache(M, 0)
        h.cache(16 * M, 0)
        h.cache(3333, 1000)
        h.set_strict_mode(0)
        expect_err(lambda: h.cache(8192, 16 * M - 4096), errno.EINVAL, "cache past the end")
        assert h.pread(4096, 0) == bytes(4096)
    "#,
    ));
}

#[test]
fn a_read_only_export_refuses_writes_zeroes_and_trims_with_eperm() {
    let data = random_bytes(11, 4 * MIB as usize);
    let d = Daemon::plain_with(&data, &["--read-only"]);
    ok(nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        assert h.is_read_only()
        with open(IMAGE, "rb") as f:
            want = f.read(65536)
        assert h.pread(65536, 0) == want
        h.set_strict_mode(0)
        expect_err(lambda: h.pwrite(b"x" * 4096, 0), errno.EPERM, "write on read-only")
        expect_err(lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA), errno.EPERM, "FUA write on read-only")
        expect_err(lambda: h.zero(4096, 0), errno.EPERM, "zero on read-only")
        expect_err(lambda: h.trim(4096, 0), errno.EPERM, "trim on read-only")
        # The stream is still in sync after the rejected payloads.
        assert h.pread(65536, 0) == want
    "#,
    ));
    let disk = std::fs::read(&d.image).unwrap();
    assert!(disk == data, "read-only export modified its backing file");
}

#[test]
fn out_of_range_reads_are_einval_and_writes_enospc() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        M = 1024 * 1024
        size = 16 * M
        h.connect_uri(URI)
        assert h.get_size() == size
        h.set_strict_mode(0)
        expect_err(lambda: h.pread(4096, size), errno.EINVAL, "read at the end")
        expect_err(lambda: h.pread(8192, size - 4096), errno.EINVAL, "read crossing the end")
        expect_err(lambda: h.pread(512, 2**63), errno.EINVAL, "read at a huge offset")
        expect_err(lambda: h.pread(4096, 2**64 - 2048), errno.EINVAL, "read whose end overflows u64")
        expect_err(lambda: h.pwrite(b"w" * 4096, size), errno.ENOSPC, "write at the end")
        expect_err(lambda: h.pwrite(b"w" * 8192, size - 4096), errno.ENOSPC, "write crossing the end")
        expect_err(lambda: h.pwrite(b"w" * 4096, 2**64 - 2048), errno.ENOSPC, "write whose end overflows u64")
        # Nothing was written, the connection still works, the last block is intact.
        assert h.pread(4096, size - 4096) == bytes(4096)
        h.pwrite(b"z" * 4096, size - 4096)
        assert h.pread(4096, size - 4096) == b"z" * 4096
    "#,
    ));
    assert_eq!(
        std::fs::metadata(&d.image).unwrap().len(),
        16 * MIB,
        "backing file size changed"
    );
}

#[test]
fn fua_and_flush_writes_are_visible_on_a_second_connection() {
    let d = Daemon::plain(16 * MIB, &[]);
    ok(nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        h2 = nbd.NBD()
        h2.connect_uri(URI)
        assert h.can_multi_conn() and h.can_fua() and h.can_flush()
        for i in range(64):
            data = os.urandom(4096)
            off = (i * 37 % 4096) * 4096
            h.pwrite(data, off, nbd.CMD_FLAG_FUA)
            assert h2.pread(4096, off) == data, "FUA write %d not visible on the second connection" % i
        for i in range(16):
            data = os.urandom(65536)
            off = i * 65536 + 8 * 1024 * 1024
            h.pwrite(data, off)
            h2.flush()
            assert h2.pread(65536, off) == data, "write + flush %d not visible" % i
            with open(IMAGE, "rb") as f:
                f.seek(off)
                assert f.read(65536) == data, "flushed write %d not in the backing file" % i
        h2.shutdown()
        h.shutdown()
    "#,
    ));
}

const RANDOM_ROUND_TRIP: &str = r#"
        import random
        rnd = random.Random(5)
        h.connect_uri(URI)
        size = h.get_size()
        shadow = bytearray(size)
        for i in range(200):
            n = rnd.randint(1, 70000)
            off = rnd.randint(0, size - n)
            data = rnd.randbytes(n)
            h.pwrite(data, off)
            shadow[off:off + n] = data
            if i % 20 == 0:
                h.flush()
            m = rnd.randint(1, 70000)
            o = rnd.randint(0, size - m)
            assert h.pread(m, o) == bytes(shadow[o:o + m]), "read %d at %d mismatch after %d writes" % (m, o, i + 1)
        h.flush()
        with open(IMAGE, "rb") as f:
            assert f.read() == bytes(shadow), "backing file differs from the shadow copy"
    "#;

#[test]
fn unaligned_writes_and_reads_round_trip_through_libnbd() {
    let d = Daemon::plain(4 * MIB, &[]);
    ok(nbdsh_d(&d, RANDOM_ROUND_TRIP));
}

#[test]
fn unaligned_writes_and_reads_round_trip_with_direct_io() {
    // --direct uses O_DIRECT for page-aligned requests and the page cache for the rest; both
    // paths hit the same pages here.
    let d = Daemon::plain(4 * MIB, &["--direct"]);
    ok(nbdsh_d(&d, RANDOM_ROUND_TRIP));
    ok(nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        for i in range(64):
            a = os.urandom(4096)
            h.pwrite(a, i * 8192)                  # aligned: O_DIRECT
            b = os.urandom(100)
            h.pwrite(b, i * 8192 + 1000)           # unaligned, same page
            want = a[:1000] + b + a[1100:]
            assert h.pread(4096, i * 8192) == want, "page %d mixes direct and buffered data wrongly" % i
        h.flush()
    "#,
    ));
}

#[test]
fn block_status_zero_extents_of_a_plain_export_read_as_zero() {
    let d = Daemon::plain(16 * MIB, &["--allow-discards"]);
    ok(nbdsh_d(
        &d,
        r#"
        h.connect_uri(URI)
        h.pwrite(b"\x01" * (2 << 20), 1 << 20)
        h.zero(1 << 20, 8 << 20)
        h.trim(1 << 20, 2 << 20)
        h.flush()
    "#,
    ));
    let script = format!("{ZERO_EXTENTS_READ_AS_ZERO}\n    assert zero_bytes > 0, \"a sparse plain file reported no zero extents\"\n");
    ok(nbdsh_d(&d, &script));
}
