//! Hot-path costs of the wire layer: binary audio frame encode/decode, PCM byte <-> sample
//! conversion, mixing, and the `buffer_request` JSON frame the server sends every 40 ms per
//! call. Run with `cargo bench -p telcoflow-proto`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use telcoflow_proto::audio::{mix_into, pcm_to_samples, samples_to_pcm};
use telcoflow_proto::media::{AudioFrame, BufferRequest, MediaServerFrame};

/// One 20 ms frame at 24 kHz: 480 samples, 960 bytes.
const SAMPLES: usize = 480;

fn frame_samples() -> Vec<i16> {
    (0..SAMPLES)
        .map(|i| ((i * 37) % 20_000) as i16 - 10_000)
        .collect()
}

fn frames(c: &mut Criterion) {
    let samples = frame_samples();
    let mut pcm = Vec::with_capacity(SAMPLES * 2);
    samples_to_pcm(&samples, &mut pcm);
    let mut wire = Vec::with_capacity(1 + pcm.len());
    AudioFrame {
        channel: 0,
        pcm: &pcm,
    }
    .encode_into(&mut wire);

    let mut g = c.benchmark_group("audio_frame_24k_20ms");
    g.throughput(Throughput::Bytes(pcm.len() as u64));
    g.bench_function("encode_into", |b| {
        let mut out = Vec::with_capacity(1 + pcm.len());
        b.iter(|| {
            out.clear();
            AudioFrame {
                channel: 0,
                pcm: black_box(&pcm),
            }
            .encode_into(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(AudioFrame::decode(black_box(&wire)).map(|f| f.pcm.len())))
    });
    g.bench_function("pcm_to_samples", |b| {
        let mut out = Vec::with_capacity(SAMPLES);
        b.iter(|| {
            out.clear();
            pcm_to_samples(black_box(&pcm), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("samples_to_pcm", |b| {
        let mut out = Vec::with_capacity(SAMPLES * 2);
        b.iter(|| {
            out.clear();
            samples_to_pcm(black_box(&samples), &mut out);
            black_box(out.len())
        })
    });
    g.bench_function("mix_into", |b| {
        let mut dst = samples.clone();
        b.iter(|| {
            mix_into(black_box(&mut dst), black_box(&samples));
            black_box(dst[0])
        })
    });
    g.finish();
}

fn buffer_request(c: &mut Criterion) {
    let frame = MediaServerFrame::BufferRequest(BufferRequest {
        requested_bytes: 1920,
        prefer_audio_frame_bytes: 960,
        channel_id: 0,
    });
    let text = frame.encode();
    let mut g = c.benchmark_group("buffer_request_json");
    g.bench_function("encode", |b| {
        b.iter(|| black_box(black_box(&frame).encode()))
    });
    g.bench_function("decode", |b| {
        b.iter(|| black_box(MediaServerFrame::decode(black_box(&text)).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, frames, buffer_request);
criterion_main!(benches);
