//! The SDK's outgoing ring buffer: the agent writes 20 ms frames, the media driver reads them
//! in answer to `buffer_request`s. Run with `cargo bench -p telcoflow --bench ring`.
//!
//! The buffer is private to the SDK: this benchmark compiles its source file as a module of
//! its own rather than reaching it through the public API.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::FutureExt;
use std::hint::black_box;

// Only part of the buffer's interface is measured here, and the module's unit tests are
// not built into a benchmark (their imports go unused).
#[allow(dead_code, unused_imports)]
#[path = "../src/ring.rs"]
mod ring;

use ring::RingBuffer;

/// One 20 ms frame at 24 kHz.
const FRAME: usize = 960;

fn ring(c: &mut Criterion) {
    let frame = vec![7u8; FRAME];
    let mut g = c.benchmark_group("ring_buffer_1mib");
    g.throughput(Throughput::Bytes(FRAME as u64));
    g.bench_function("write_then_read_960", |b| {
        let ring = RingBuffer::new(1 << 20);
        let mut out = Vec::with_capacity(FRAME);
        b.iter(|| {
            ring.write_all(black_box(&frame))
                .expect("room for one frame");
            out.clear();
            // Data is queued, so the read completes in its first poll.
            let n = ring.read(FRAME, FRAME, &mut out).now_or_never();
            black_box(n)
        })
    });
    g.bench_function("write_960_wrapping", |b| {
        let ring = RingBuffer::new(1 << 20);
        b.iter(|| {
            if ring.write_all(black_box(&frame)).is_err() {
                ring.clear();
            }
        })
    });
    g.bench_function("clear_full", |b| {
        let ring = RingBuffer::new(1 << 20);
        let second = vec![1u8; 48_000];
        b.iter(|| {
            ring.write_all(&second).expect("room for one second");
            black_box(ring.clear())
        })
    });
    g.finish();
}

criterion_group!(benches, ring);
criterion_main!(benches);
