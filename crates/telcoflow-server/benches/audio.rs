//! The server's per-frame audio work: sample-rate conversion between a leg's rate and the
//! agent's (rubato FFT resampler, 20 ms chunks). Mixing is benchmarked with the proto crate's
//! `mix_into` in `telcoflow-proto/benches/frames.rs`. Run with `cargo bench -p telcoflow-server`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use telcoflow_server::audio::Resampler;

fn tone(rate: u32, samples: usize) -> Vec<i16> {
    (0..samples)
        .map(|n| {
            let t = n as f32 / rate as f32;
            ((2.0 * std::f32::consts::PI * 440.0 * t).sin() * 8000.0) as i16
        })
        .collect()
}

fn resample(c: &mut Criterion) {
    let mut g = c.benchmark_group("resample_20ms_frame");
    for (from, to) in [
        (8000, 24_000),
        (16_000, 24_000),
        (24_000, 8000),
        (24_000, 16_000),
        (24_000, 24_000),
    ] {
        let input = tone(from, (from / 50) as usize);
        g.throughput(Throughput::Elements(input.len() as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{from}->{to}")),
            &input,
            |b, input| {
                let mut r = Resampler::new(from, to).expect("supported rates");
                let mut out = Vec::with_capacity(to as usize / 25);
                b.iter(|| {
                    out.clear();
                    r.process(black_box(input), &mut out);
                    black_box(out.len())
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, resample);
criterion_main!(benches);
