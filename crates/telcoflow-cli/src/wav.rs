//! WAV files in and out of the simulated phone: any rate, mono or stereo, integer or float in;
//! mono s16 at the phone's rate out.

use anyhow::{Context, bail};
use hound::{SampleFormat, WavReader, WavSpec, WavWriter};
use std::path::Path;
use telcoflow_server::audio::Resampler;

/// Reads `path` as mono s16 at `rate` Hz: channels are averaged, samples scaled to 16 bits and
/// the rate converted with a band-limited resampler.
pub(crate) fn read_mono(path: &Path, rate: u32) -> anyhow::Result<Vec<i16>> {
    let reader =
        WavReader::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let spec = reader.spec();
    let channels = usize::from(spec.channels);
    if channels == 0 {
        bail!("{} has no channels", path.display());
    }
    let interleaved: Vec<f32> = match spec.sample_format {
        SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .with_context(|| format!("cannot read {}", path.display()))?,
        SampleFormat::Int => {
            if spec.bits_per_sample == 0 || spec.bits_per_sample > 32 {
                bail!(
                    "{}: unsupported {} bits per sample",
                    path.display(),
                    spec.bits_per_sample
                );
            }
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|s| s as f32 * scale))
                .collect::<Result<_, _>>()
                .with_context(|| format!("cannot read {}", path.display()))?
        }
    };
    let mono: Vec<i16> = interleaved
        .chunks(channels)
        .map(|frame| {
            let avg = frame.iter().sum::<f32>() / frame.len() as f32;
            (avg * 32768.0).clamp(-32768.0, 32767.0) as i16
        })
        .collect();
    resample(&mono, spec.sample_rate, rate)
}

/// Converts mono s16 from `from` Hz to `to` Hz, same duration, without the converter's delay.
pub(crate) fn resample(input: &[i16], from: u32, to: u32) -> anyhow::Result<Vec<i16>> {
    let mut resampler = Resampler::new(from, to).context("cannot convert the sample rate")?;
    if resampler.is_passthrough() {
        return Ok(input.to_vec());
    }
    let expected = (input.len() as u64 * u64::from(to) / u64::from(from)) as usize;
    let delay = resampler.delay();
    let mut out = Vec::with_capacity(expected + delay);
    resampler.process(input, &mut out);
    // Flush: zeros push the last partial chunk and the converter's delay line through.
    let flush = vec![0i16; (from as usize / 50 + 1) * 2 + delay * from as usize / to as usize + 1];
    while out.len() < expected + delay {
        resampler.process(&flush, &mut out);
    }
    out.drain(..delay);
    out.truncate(expected);
    Ok(out)
}

/// Writes mono s16 samples at `rate` Hz.
pub(crate) fn write_mono(path: &Path, rate: u32, samples: &[i16]) -> anyhow::Result<()> {
    let spec = WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: SampleFormat::Int,
    };
    let mut writer = WavWriter::create(path, spec)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = writer.get_i16_writer(samples.len() as u32);
    for &s in samples {
        w.write_sample(s);
    }
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .finalize()
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crossings(s: &[i16]) -> usize {
        s.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count()
    }

    #[test]
    fn stereo_44k1_float_becomes_mono_16k_with_same_pitch_and_length() {
        let dir = std::env::temp_dir().join(format!("telcoflow-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.wav");
        let spec = WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 32,
            sample_format: SampleFormat::Float,
        };
        let mut w = WavWriter::create(&path, spec).unwrap();
        for i in 0..44_100 {
            let v = (i as f32 * 440.0 * std::f32::consts::TAU / 44_100.0).sin() * 0.5;
            w.write_sample(v).unwrap();
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
        let mono = read_mono(&path, 16_000).unwrap();
        assert_eq!(mono.len(), 16_000);
        let c = crossings(&mono[1000..9000]) as i64; // 0.5 s
        assert!((c - 440).abs() <= 4, "{c}");
        let peak = mono[1000..15000]
            .iter()
            .map(|s| s.unsigned_abs())
            .max()
            .unwrap();
        assert!((15_000..=17_500).contains(&peak), "{peak}");

        let out = dir.join("out.wav");
        write_mono(&out, 16_000, &mono).unwrap();
        let back = read_mono(&out, 16_000).unwrap();
        assert_eq!(back, mono);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn int16_mono_at_8k_is_upsampled() {
        let input: Vec<i16> = (0..8000)
            .map(|i| ((i as f32 * 300.0 * std::f32::consts::TAU / 8000.0).sin() * 8000.0) as i16)
            .collect();
        let out = resample(&input, 8000, 24_000).unwrap();
        assert_eq!(out.len(), 24_000);
        let c = crossings(&out[2400..14_400]) as i64; // 0.5 s
        assert!((c - 300).abs() <= 4, "{c}");
    }
}
