//! Audio for the examples: WAV files and tones as s16le mono PCM at the call's rate.
// Each example uses only part of this module.
#![allow(dead_code)]

use std::time::Duration;
use telcoflow::SampleRate;

/// Bytes of one 20 ms frame at `rate`.
pub(crate) fn frame_bytes(rate: SampleRate) -> usize {
    rate.hz() as usize / 50 * 2
}

/// Pads `pcm` with silence to whole 20 ms frames: the server takes audio a frame at a time,
/// so a partial last frame would wait for more.
pub(crate) fn pad_to_frames(pcm: &mut Vec<u8>, rate: SampleRate) {
    let frame = frame_bytes(rate);
    pcm.resize(pcm.len().div_ceil(frame) * frame, 0);
}

/// `duration` of a sine at `hz`, s16le mono at `rate`, at about a quarter of full scale.
pub(crate) fn tone(hz: f32, duration: Duration, rate: SampleRate) -> Vec<u8> {
    let rate = rate.hz() as f32;
    let samples = (duration.as_secs_f32() * rate) as usize;
    (0..samples)
        .flat_map(|i| {
            let s = (std::f32::consts::TAU * hz * i as f32 / rate).sin() * 8000.0;
            (s as i16).to_le_bytes()
        })
        .collect()
}

/// Reads a 16-bit WAV (any rate, any channel count) as mono s16le PCM at `rate`: channels
/// are averaged and the rate converted linearly, which is enough for prompts.
pub(crate) fn load(path: &std::path::Path, rate: SampleRate) -> anyhow::Result<Vec<u8>> {
    let mut reader =
        hound::WavReader::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let spec = reader.spec();
    anyhow::ensure!(
        spec.bits_per_sample == 16 && spec.sample_format == hound::SampleFormat::Int,
        "{}: only 16-bit integer WAV files are supported here",
        path.display()
    );
    let channels = usize::from(spec.channels.max(1));
    let samples: Vec<i16> = reader.samples::<i16>().collect::<Result<_, _>>()?;
    let mono: Vec<f32> = samples
        .chunks(channels)
        .map(|f| f.iter().map(|&s| f32::from(s)).sum::<f32>() / f.len() as f32)
        .collect();
    let step = f64::from(spec.sample_rate) / f64::from(rate.hz());
    let out_len = (mono.len() as f64 / step) as usize;
    let mut pcm = Vec::with_capacity(out_len * 2);
    for i in 0..out_len {
        let pos = i as f64 * step;
        let j = pos as usize;
        let frac = (pos - j as f64) as f32;
        let a = mono[j];
        let b = *mono.get(j + 1).unwrap_or(&a);
        let s = (a + (b - a) * frac).clamp(-32768.0, 32767.0) as i16;
        pcm.extend_from_slice(&s.to_le_bytes());
    }
    Ok(pcm)
}
