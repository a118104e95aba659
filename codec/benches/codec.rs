//! Question answered: how many frames per second can one core frame and unframe?
//! A 120-byte body stands for a typical chat message; frames are decoded from one
//! buffer holding 64 of them, as a read of a busy connection would deliver.
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mychat_codec::{encode_frame, FrameCodec, Header};
use tokio_util::codec::Decoder;

fn bench(c: &mut Criterion) {
    let body = vec![0x5Au8; 120];
    let mut wire = BytesMut::new();
    for i in 0..64 {
        encode_frame(Header::request(3001, i), &body, &mut wire);
    }
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(64));
    g.bench_function("encode_64x120B", |b| {
        let mut dst = BytesMut::with_capacity(wire.len());
        b.iter(|| {
            dst.clear();
            for i in 0..64 {
                encode_frame(Header::request(3001, i), &body, &mut dst);
            }
            std::hint::black_box(&dst);
        })
    });
    g.bench_function("decode_64x120B", |b| {
        let mut codec = FrameCodec::default();
        b.iter_batched(
            || wire.clone(),
            |mut buf| {
                let mut n = 0;
                while let Some(f) = codec.decode(&mut buf).unwrap() {
                    n += f.body.len();
                }
                std::hint::black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
