//! The NBD request/reply codec: cost per request header decoded and per reply encoded.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

use nbdcrypt::nbd::codec::{self, Command, RequestHeader};
use nbdcrypt::nbd::wire::{CMD_FLAG_FUA, CMD_WRITE, INFO_BLOCK_SIZE, INFO_NAME};

fn request_headers(c: &mut Criterion) {
    let h = RequestHeader {
        flags: CMD_FLAG_FUA,
        command: Command::Write,
        cookie: 7,
        offset: 1 << 30,
        length: 4096,
    };
    let raw = codec::encode_request(&h, CMD_WRITE);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_request", |b| {
        b.iter(|| codec::decode_request(black_box(&raw)))
    });
    g.bench_function("simple_reply", |b| {
        b.iter(|| codec::simple_reply(0, black_box(42)))
    });
    g.bench_function("offset_data_prefix", |b| {
        b.iter(|| codec::offset_data_prefix(black_box(42), black_box(4096), black_box(65536)))
    });
    let mut info = Vec::new();
    info.extend_from_slice(&8u32.to_be_bytes());
    info.extend_from_slice(b"nbdcrypt");
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&INFO_NAME.to_be_bytes());
    info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    g.bench_function("parse_info_request", |b| {
        b.iter(|| codec::parse_info_request(black_box(&info)))
    });
    g.finish();
}

criterion_group!(benches, request_headers);
criterion_main!(benches);
