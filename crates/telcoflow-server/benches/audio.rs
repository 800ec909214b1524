//! The server's per-frame audio work: sample-rate conversion between a leg's rate and the
//! agent's (rubato FFT resampler, 20 ms chunks) and G.711 for SIP/RTP legs (one 20 ms packet,
//! 160 samples at 8 kHz). Mixing is benchmarked with the proto crate's
//! `mix_into` in `telcoflow-proto/benches/frames.rs`. Run with `cargo bench -p telcoflow-server`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use telcoflow_server::audio::Resampler;
use telcoflow_sip::rtp::g711::G711;

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

fn g711(c: &mut Criterion) {
    let pcm = tone(8000, 160);
    let mut g = c.benchmark_group("g711_20ms_packet");
    g.throughput(Throughput::Elements(pcm.len() as u64));
    for law in [G711::Pcmu, G711::Pcma] {
        let mut payload = vec![0u8; pcm.len()];
        law.encode(&pcm, &mut payload);
        g.bench_function(format!("{law:?}/encode"), |b| {
            let mut out = vec![0u8; pcm.len()];
            b.iter(|| black_box(law.encode(black_box(&pcm), &mut out)))
        });
        g.bench_function(format!("{law:?}/decode"), |b| {
            let mut out = vec![0i16; pcm.len()];
            b.iter(|| black_box(law.decode(black_box(&payload), &mut out)))
        });
    }
    g.finish();
}

criterion_group!(benches, resample, g711);
criterion_main!(benches);
