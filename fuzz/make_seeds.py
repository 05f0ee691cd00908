#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, written to fuzz/seeds/TARGET/ (not committed).

LUKS2 seeds are cut from the cryptsetup-made test vectors in TESTDATA (default
/work/shared/testdata/luks2, or $NBDCRYPT_LUKS2_TESTDATA): their header copies, JSON areas and
keyslot areas, with the control byte each harness expects (see fuzz/src/luks2.rs). NBD, control,
token, PKCS#11 and TOML seeds are valid messages built here. Deterministic: same files each run.
"""
import gzip, json, os, random, struct, sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "seeds")
# CI clones `shared/` beside the repository; the developers' machines have it at /work/shared.
_BESIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "testdata", "luks2")
TESTDATA = os.environ.get(
    "NBDCRYPT_LUKS2_TESTDATA",
    _BESIDE if os.path.isdir(_BESIDE) else "/work/shared/testdata/luks2",
)


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def image(name, length):
    with gzip.open(os.path.join(TESTDATA, name + ".img.gz"), "rb") as f:
        return f.read(length)


def json_area(img, off, hdr_size):
    area = img[off + 4096: off + hdr_size]
    return area.split(b"\0", 1)[0]


def luks2():
    if not os.path.isdir(TESTDATA):
        print(f"make_seeds: no LUKS2 test vectors in {TESTDATA}; LUKS2 seeds skipped", file=sys.stderr)
        return
    # ctrl: bit0/1 fix checksums, bit2 attached read, bit3 repair / unlock_slot,
    # bits4-5 device length (0 as is, 1: 1 MiB+64 KiB, 2: 16 MiB+64 KiB, 3: 4 MiB), bits6-7 passphrase.
    a = image("tv-a-ss4096", 548864)  # header copies + both keyslot areas
    b = image("tv-b-ss512", 290816)
    c = image("tv-c-detached-hdr", 393216)
    for tag, img, hs, ext, attached in (("a", a, 16384, 2, 4), ("b", b, 16384, 1, 4), ("c", c, 65536, 0, 0)):
        head = img[: 2 * hs]
        put("luks2_header", f"tv-{tag}", head + bytes([attached | ext << 4]))
        put("luks2_header", f"tv-{tag}-fix", head + bytes([3 | attached | ext << 4]))
        # A stale secondary (flipped JSON byte): read picks the primary, repair rewrites it.
        stale = bytearray(head)
        stale[hs + 4096 + 10] ^= 0x20
        put("luks2_header", f"tv-{tag}-stale2-repair", bytes(stale) + bytes([1 | 8 | attached | ext << 4]))
        sel = {16384: 0, 32768: 1, 65536: 2}[hs]
        put("luks2_json_raw", f"tv-{tag}", bytes([sel]) + json_area(img, 0, hs))
    put("luks2_image_unlock", "tv-a-pbkdf2", a + bytes([0 << 6 | 2 << 4 | 4 | 3]))
    put("luks2_image_unlock", "tv-a-argon2id", a + bytes([1 << 6 | 2 << 4 | 4 | 3]))
    put("luks2_image_unlock", "tv-a-wrong-slots", a + bytes([2 << 6 | 2 << 4 | 8 | 4 | 3]))
    put("luks2_image_unlock", "tv-b-argon2i", b + bytes([2 << 6 | 1 << 4 | 4 | 3]))
    put("luks2_image_unlock", "tv-c-detached", c + bytes([3 << 6 | 8 | 3]))
    with open(os.path.join(TESTDATA, "reencrypt-encrypt-initial.json")) as f:
        reenc = json.dumps(json.load(f), separators=(",", ":")).encode()
    put("luks2_json_raw", "reencrypt-initial", b"\0" + reenc)


# --- NBD -------------------------------------------------------------------------------------
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def opt(option, data=b""):
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def info_req(name, reqs=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)


def meta_req(name, queries):
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


def req(cmd, off, length, cookie, flags=0, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, off, length) + payload


def transmission_script():
    data = bytes((i * 7) & 0xFF for i in range(4096))
    return b"".join([
        req(1, 0, 4096, 1, payload=data),          # WRITE
        req(0, 0, 4096, 2),                       # READ
        req(1, 100, 1000, 3, 1, data[:1000]),     # unaligned WRITE, FUA
        req(0, 0, 8192, 4, 4),                    # READ, DF
        req(6, 8192, 16384, 5, 2),                # WRITE_ZEROES, NO_HOLE
        req(4, 65536, 4096, 6),                   # TRIM
        req(5, 0, 65536, 7),                      # CACHE
        req(7, 0, 262144, 8, 8),                  # BLOCK_STATUS, REQ_ONE
        req(3, 0, 0, 9),                          # FLUSH
        req(0, 262144 - 512, 1024, 10),           # READ past the end
        req(2, 0, 0, 11),                         # DISC
    ])


def nbd():
    t = transmission_script()
    go = opt(7, info_req(b"vol", (3, 0)))
    streams = {
        "go-rw": struct.pack(">I", 3) + go + t,
        "structured-meta-go": struct.pack(">I", 3) + opt(8) + opt(10, meta_req(b"vol", [b"base:allocation"]))
        + opt(3) + opt(6, info_req(b"vol", (3, 1, 2))) + go + t,
        "export-name": struct.pack(">I", 1) + opt(1, b"vol") + t,
        "list-meta-abort": struct.pack(">I", 3) + opt(9, meta_req(b"vol", [b"base:", b"qemu:dirty-bitmap:x"])) + opt(2),
        "odd-options": struct.pack(">I", 3) + opt(11) + opt(5) + opt(99, b"xyz") + opt(6, b"\0\0") + opt(7, info_req(b"")) + t,
    }
    for name, s in streams.items():
        put("nbd_handshake", name + "-unlocked", b"\x01" + s)
        put("nbd_handshake", name + "-locked", b"\x00" + s)
    put("nbd_handshake", "go-4k-discard", b"\x0d" + streams["structured-meta-go"])
    for ctrl in (0x00, 0x03, 0x0F, 0x04):
        put("nbd_transmission", f"script-{ctrl:02x}", bytes([ctrl]) + t)
    rnd = random.Random(8)
    for i in range(8):
        put("nbd_session_model", f"random-{i}", bytes(rnd.randrange(256) for _ in range(64 + 96 * i)))
        put("xts_diff", f"random-{i}", bytes(rnd.randrange(256) for _ in range(80 + 40 * i)))
        blk = (64, 55, 4096, 512, 1, 119, 4000, 65)[i]
        put("sha256_blocks_diff", f"block-{blk}", (blk - 1).to_bytes(2, "little") + bytes([i])
            + bytes(rnd.randrange(256) for _ in range(blk * (i % 4 + 1) + i)))
        put("luks2_json_model", f"random-{i}", bytes(rnd.randrange(256) for _ in range(256 + 256 * i)))


# --- control, tokens, PKCS#11, TOML ----------------------------------------------------------
def control():
    lines = [
        {"v": 1, "op": "unlock", "secret": "cGFzc3dvcmQ=", "slot": 0},
        {"v": 1, "op": "unlock", "secret": "cGFzc3dvcmQ="},
        {"v": 1, "op": "unlock_token"},
        {"v": 1, "op": "rekey", "slot": 3},
        {"v": 1, "op": "lock", "force": True},
        {"v": 1, "op": "status"},
        {"v": 1, "op": "share", "name": "alice", "secret": "cGFzcw=="},
        {"v": 1, "op": "reencrypt_share", "name": "alice", "secret": "cGFzcw=="},
        {"v": 2, "op": "status"},
        {"v": 1, "status": {"state": "unlocked", "volume_uuid": "11111111-2222-4333-8444-555555555555",
                            "cipher": "aes-xts-plain64", "sector_size": 4096, "size": 65536, "export_name": "vol",
                            "clients": 1, "reads": 2, "writes": 3, "bytes_read": 4, "bytes_written": 5,
                            "flushes": 6, "errors": 0}},
        {"v": 1, "status": {"state": "locked", "volume_uuid": "u", "cipher": "aes-xts-plain64", "sector_size": 512,
                            "size": 0, "export_name": "", "clients": 0, "reads": 0, "writes": 0, "bytes_read": 0,
                            "bytes_written": 0, "flushes": 0, "errors": 0, "locked_reason": "operator"}},
        {"v": 1, "error": {"kind": "rate_limited", "message": "wait", "retry_after_secs": 30}},
        {"v": 1, "error": {"kind": "wrong_passphrase", "message": "no keyslot opened"}},
    ]
    for i, l in enumerate(lines):
        put("control_proto", f"line-{i}", json.dumps(l, separators=(",", ":")).encode() + b"\n")
    tokens = [
        {"type": "nbdcrypt-aws-kms", "keyslots": ["1"], "nbdcrypt_version": 1, "created": "2026-01-01T00:00:00Z",
         "sealed": "AQIDBAUGBwgJCgsMDQ4PEA==", "kms-key-id": "arn:aws:kms:eu-west-1:111122223333:key/abcd",
         "kms-region": "eu-west-1", "kms-endpoint": "https://kms.eu-west-1.amazonaws.com",
         "kms-encryption-context": {"nbdcrypt:volume": "11111111-2222-4333-8444-555555555555", "nbdcrypt:keyslot": "1"}},
        {"type": "nbdcrypt-pkcs11", "keyslots": ["2"], "nbdcrypt_version": 1, "created": "2026-01-01T00:00:00Z",
         "sealed": "AQIDBAUGBwgJCgsMDQ4PEBESExQ=", "pkcs11-uri": "pkcs11:token=nbd;object=vk;type=secret-key",
         "iv": "AAECAwQFBgcICQoL", "mechanism": "aes-gcm"},
        {"type": "example-kms", "keyslots": ["1"], "anything": "goes"},
        {"type": "nbdcrypt-pkcs11", "keyslots": ["0", "1"], "nbdcrypt_version": 0},
        {"type": "nbdcrypt-quorum", "keyslots": ["2"], "nbdcrypt_version": 1, "created": "2026-01-01T00:00:00Z",
         "threshold": 2, "shares": [
            {"x": 1, "holder": "nbdcrypt-aws-kms", "tag": "A" * 43 + "=", "sealed": "AQIDBAUGBwgJCgsMDQ4PEA==",
             "params": {"kms-key-id": "arn:aws:kms:eu-west-1:111122223333:key/abcd"}},
            {"x": 2, "holder": "nbdcrypt-pkcs11", "tag": "A" * 43 + "=", "sealed": "AQIDBAUGBwgJCgsMDQ4PEBESExQ=",
             "params": {"pkcs11-uri": "pkcs11:token=nbd;object=vk;type=secret-key", "iv": "AAECAwQFBgcICQoL"}},
            {"x": 3, "holder": "passphrase", "name": "alice", "tag": "A" * 43 + "=", "sealed": "A" * 43 + "=",
             "kdf": {"type": "argon2id", "time": 4, "memory": 65536, "cpus": 1, "salt": "A" * 43 + "="}}]},
    ]
    for i, t in enumerate(tokens):
        put("seal_token", f"token-{i}", json.dumps(t).encode())
    uris = [
        "pkcs11:token=nbd;object=vk;type=secret-key",
        "pkcs11:model=SoftHSM%20v2;manufacturer=SoftHSM%20project;serial=1234;token=nbd;id=%01%02;object=vk?pin-source=file:/run/pin",
        "pkcs11:token=nbd;object=vk?pin-value=123456&module-path=/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11:slot-id=3;object=k?module-name=softhsm2",
        "file:/run/credentials/pin", "env:PKCS11_PIN", "cred:pkcs11-pin",
    ]
    for i, u in enumerate(uris):
        put("pkcs11_uri", f"uri-{i}", u.encode())
    tomls = [
        'volume = "/srv/db.img"\nname = "db"\nunix = "/run/nbdcrypt/db.sock"\ncontrol = "/run/nbdcrypt/db.control.sock"\n'
        'unlock-key-file = "/run/credentials/nbdcryptd@db.service/passphrase"\nallow-discards = false\n'
        'read-only = false\nmax-conn-bytes = "64M"\n',
        'plain = "/srv/plain.img"\ntcp = "127.0.0.1:10809"\ninsecure-tcp = true\nsocket-mode = "0660"\n'
        'threads = 4\nmax-connections = 16\nmax-server-bytes = "1G"\nhandshake-timeout = 10\nlog-level = "debug"\n',
        'volume = "/dev/sdb"\nauto-unlock = true\npkcs11-module = "/usr/lib/softhsm/libsofthsm2.so"\n'
        'pkcs11-pin = "file:/run/pin"\naudit-log = "/var/log/nbdcrypt.audit"\ndirect = true\ndescription = "x"\n',
        'volume = "/a"\nplain = "/b"\n',
        'volume = 3\n[table]\nx = 1\n',
    ]
    for i, t in enumerate(tomls):
        put("config_toml", f"config-{i}.toml", t.encode())

    heads = [
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9725\r\nUser-Agent: Prometheus/2.42.0\r\n"
        b"Accept: text/plain;version=0.0.4\r\n\r\n",
        b"GET /metrics?x=1 HTTP/1.0\n\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /metrics HTTP/1.1\r\nHost: " + b"x" * 9000 + b"\r\n\r\n",
        b"GET /metrics",
    ]
    for i, h in enumerate(heads):
        put("metrics_http", f"head-{i}", h)


def clevis():
    """clevis tokens (tang, tpm2, sss of both) shaped as clevis 19 writes them; the crypto is
    filler (decryption fails at the tag), the structure is real."""
    import base64
    b64u = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    hdr = lambda h: b64u(json.dumps(h, separators=(",", ":"), sort_keys=True).encode())
    pt = lambda n: {"crv": "P-521", "kty": "EC", "x": b64u(bytes([n]) * 66), "y": b64u(bytes([n + 1]) * 66)}
    tang = {"alg": "ECDH-ES", "enc": "A256GCM", "kid": "tZDid2ZRjsAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "epk": pt(1),
            "clevis": {"pin": "tang", "tang": {"url": "http://127.0.0.1:7500", "adv": {"keys": [
                dict(pt(3), alg="ES512", key_ops=["verify"]), dict(pt(5), alg="ECMR", key_ops=["deriveKey"])]}}}}
    tpm2 = {"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "tpm2", "tpm2": {
        "hash": "sha256", "key": "ecc", "jwk_pub": b64u(b"\x00\x2e" + bytes(46)), "jwk_priv": b64u(b"\x00\xee" + bytes(238)),
        "pcr_bank": "sha256", "pcr_ids": "0,7"}}}
    compact = lambda h, n: f"{hdr(h)}..{b64u(bytes(12))}.{b64u(bytes(n))}.{b64u(bytes(16))}"
    sss = {"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "sss", "sss": {
        "jwe": [compact(tang, 64), compact(tpm2, 64)], "p": b64u(bytes([0xff]) * 31 + b"\x43"), "t": 2}}}
    for i, h in enumerate([tang, tpm2, sss]):
        jwe = {"ciphertext": b64u(bytes(43)), "encrypted_key": "", "iv": b64u(bytes(12)),
               "protected": hdr(h), "tag": b64u(bytes(16))}
        put("clevis_token", f"token-{i}", json.dumps({"type": "clevis", "keyslots": [str(i + 1)], "jwe": jwe}).encode())
        put("clevis_token", f"compact-{i}", compact(h, 64).encode())


def upstream():
    # Replies to a read of 512 << k bytes at 4096 (handle 1) and a flush (handle 2).
    def chunk(flags, ty, handle, payload):
        return struct.pack(">IHHQI", 0x668E33EF, flags, ty, handle, len(payload)) + payload
    n = 512
    simple = struct.pack(">IIQ", 0x67446698, 0, 1) + bytes(n) + struct.pack(">IIQ", 0x67446698, 0, 2)
    put("upstream_reply", "simple", bytes([0]) + simple)
    data = chunk(0, 1, 1, struct.pack(">Q", 4096) + bytes(256))
    hole = chunk(1, 2, 1, struct.pack(">QI", 4096 + 256, 256))
    err = chunk(1, 0x8001, 2, struct.pack(">IH", 5, 3) + b"bad")
    put("upstream_reply", "structured", bytes([1]) + data + hole + chunk(1, 0, 2, b""))
    put("upstream_reply", "error", bytes([1]) + err + chunk(1, 1, 1, struct.pack(">Q", 4096) + bytes(n)))
def tls():
    """tls_certificates: the throw-away fixtures in tls-seeds/ (make.sh there) as PEM text and as
    DER wrapped by the harness; byte 0 and 1 as in fuzz/src/tls.rs."""
    import base64
    d = os.path.join(HERE, "tls-seeds")
    f = lambda n: open(os.path.join(d, n), "rb").read()
    der = lambda pem: base64.b64decode(b"".join(l for l in pem.splitlines() if not l.startswith(b"-----")))
    def inp(ctl, label, cert, key, ca=b"", crl=b""):
        return bytes([ctl, label]) + b"".join(struct.pack(">H", len(x)) + x for x in (cert, key, ca, crl))
    cert, key, ca, crl = f("server-cert.pem"), f("server-key.pem"), f("ca-cert.pem"), f("ca-crl.pem")
    put("tls_certificates", "ec-pkcs8", inp(0, 0, cert, key))
    put("tls_certificates", "ec-pkcs8-verify-crl", inp(3, 0, cert, key, ca, crl))
    put("tls_certificates", "ec-pkcs8-verify", inp(1, 0, cert, key, ca))
    put("tls_certificates", "ec-sec1", inp(0, 1, cert, f("server-key-sec1.pem")))
    put("tls_certificates", "chain", inp(1 | 1 << 6, 0, cert + ca, key, ca))
    put("tls_certificates", "rsa-pkcs1", inp(0, 2, f("rsa-cert.pem"), f("rsa-key.pem")))
    put("tls_certificates", "certtool-padded-scalar", inp(0, 0, f("padded-cert.pem"), f("padded-key.pem")))
    put("tls_certificates", "mismatched-pair", inp(0, 0, f("rsa-cert.pem"), key))
    put("tls_certificates", "encrypted-label", inp(1 << 3, 3, cert, der(key)))
    put("tls_certificates", "der-all-verify-crl", inp(3 | 0b1111 << 2, 0, der(cert), der(key), der(ca), der(crl)))
    put("tls_certificates", "der-sec1", inp(0b11 << 2, 1, der(cert), der(f("server-key-sec1.pem"))))
    put("tls_certificates", "der-rsa", inp(0b11 << 2, 2, der(f("rsa-cert.pem")), der(f("rsa-key.pem"))))
    put("tls_certificates", "der-padded", inp(0b11 << 2, 0, der(f("padded-cert.pem")), der(f("padded-key.pem"))))
    put("tls_certificates", "raw-der-unwrapped", inp(1, 0, der(cert), der(key), der(ca)))


if __name__ == "__main__":
    upstream()
    luks2()
    nbd()
    control()
    clevis()
    tls()
    n = sum(len(fs) for _, _, fs in os.walk(OUT))
    print(f"make_seeds: {n} seed files in {OUT}")
