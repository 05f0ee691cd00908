//! Large READs are streamed: each piece the device has read (and decrypted) goes out as its own
//! OFFSET_DATA chunk right away, DONE on the last (when the socket is free at that moment; else
//! the reply goes whole). libnbd's `pread_structured` shows every chunk;
//! the pieces must cover the read exactly, in order, with the right data, for plain files and
//! for LUKS2 volumes with 512- and 4096-byte sectors, also with several large reads in flight on
//! one connection; a DF read still gets one chunk.

use nbdcrypt_tests::*;

const SCRIPT: &str = r#"
    h.connect_uri(URI)
    assert h.get_structured_replies_negotiated()
    M = 1024 * 1024
    data = os.urandom(6 * M)
    h.pwrite(data, 0)
    streamed = 0
    # (offset, length): unaligned starts and odd lengths take the unstreamed path in the crypt
    # layer (read-modify), aligned ones the streamed one; all must read back what was written.
    for off, n in ((0, M), (M, 3 * M + 4096), (4096, 2 * M), (512, M + 512), (3, 300 * 1024),
                   (0, 256 * 1024 + 4096), (5 * M, M)):
        chunks = []
        def cb(subbuf, offset, status, error):
            chunks.append((offset, len(subbuf), status, bytes(subbuf)))
            return 0
        buf = h.pread_structured(n, off, cb)
        assert buf == data[off:off + n], "read of %d at %d returned wrong data" % (n, off)
        pos = off
        for o, l, s, b in chunks:
            assert s == nbd.READ_DATA, chunks
            assert o == pos, "chunks out of order or with a gap at %d: %r" % (pos, [c[:3] for c in chunks])
            assert b == data[o:o + l], "chunk at %d carries wrong data" % o
            pos = o + l
        assert pos == off + n, "chunks do not cover the read: %r" % [c[:3] for c in chunks]
        if len(chunks) > 1:
            streamed += 1
        # DF: one chunk, whatever the size.
        chunks = []
        buf = h.pread_structured(n, off, cb, nbd.CMD_FLAG_DF)
        assert buf == data[off:off + n] and len(chunks) == 1, [c[:3] for c in chunks]
    # A reply is streamed when the socket is free at once (the previous reply's sender may
    # still hold it for a moment): most of the five aligned reads over 256 KiB are.
    assert streamed >= 1, "no large read was streamed"
    # Plain pread (libnbd reassembles) and concurrent large reads on one connection.
    assert h.pread(4 * M, M) == data[M:5 * M]
    bufs = [nbd.Buffer(M) for _ in range(6)]
    cookies = [h.aio_pread(bufs[i], i * M) for i in range(6)]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(6):
        assert bufs[i].to_bytearray() == data[i * M:(i + 1) * M], "concurrent read %d" % i
    h.shutdown()
"#;

#[test]
fn plain_file_large_reads_arrive_in_ordered_chunks_with_the_written_data() {
    let d = Daemon::plain(16 * MIB, &[]);
    nbdsh_d(&d, SCRIPT).success();
}

#[test]
fn luks2_4096_byte_sectors_large_reads_arrive_in_ordered_chunks_with_the_written_data() {
    let d = Daemon::luks(32 * MIB, 4096, &[]);
    nbdsh_d(&d, SCRIPT).success();
}

#[test]
fn luks2_512_byte_sectors_large_reads_arrive_in_ordered_chunks_with_the_written_data() {
    let d = Daemon::luks(32 * MIB, 512, &[]);
    nbdsh_d(&d, SCRIPT).success();
}
