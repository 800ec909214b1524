//! Audio processing shared by every leg of a call: sample-rate conversion between a leg's rate
//! and the agent's rate.
//!
//! Conversion uses rubato's FFT resampler (band-limited, not sample dropping). It works on fixed
//! 20 ms chunks; [`Resampler::process`] accepts any length and keeps the remainder for the next
//! call, so callers can feed frames as they arrive. Buffers are allocated once, at construction.

use rubato::{FftFixedInOut, Resampler as _};
use telcoflow_proto::audio::FRAME_MS;

/// A mono s16 sample-rate converter.
pub struct Resampler {
    inner: Option<Box<Fft>>,
}

struct Fft {
    resampler: FftFixedInOut<f32>,
    /// Input samples waiting for a whole chunk.
    pending: Vec<f32>,
    chunk_in: usize,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("passthrough", &self.inner.is_none())
            .finish()
    }
}

/// The rates cannot be converted.
#[derive(Debug, thiserror::Error)]
#[error("cannot resample {from} Hz to {to} Hz: {reason}")]
pub struct ResampleError {
    from: u32,
    to: u32,
    reason: String,
}

impl Resampler {
    /// A converter that passes samples through unchanged.
    pub fn passthrough() -> Self {
        Self { inner: None }
    }

    /// A converter from `from_hz` to `to_hz`. Equal rates give a pass-through.
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Self, ResampleError> {
        if from_hz == to_hz {
            return Ok(Self::passthrough());
        }
        let err = |reason: String| ResampleError {
            from: from_hz,
            to: to_hz,
            reason,
        };
        if from_hz == 0 || to_hz == 0 {
            return Err(err("rate is zero".into()));
        }
        let chunk = (from_hz * FRAME_MS / 1000).max(1) as usize;
        let resampler = FftFixedInOut::<f32>::new(from_hz as usize, to_hz as usize, chunk, 1)
            .map_err(|e| err(e.to_string()))?;
        let chunk_in = resampler.input_frames_next();
        let out_max = resampler.output_frames_max();
        Ok(Self {
            inner: Some(Box::new(Fft {
                resampler,
                pending: Vec::with_capacity(chunk_in * 4),
                chunk_in,
                input: vec![0.0; chunk_in],
                output: vec![0.0; out_max],
            })),
        })
    }

    /// Whether input passes through unchanged.
    pub fn is_passthrough(&self) -> bool {
        self.inner.is_none()
    }

    /// Converts `input`, appending every whole converted chunk to `out`. Samples that do not
    /// yet fill a chunk are kept for the next call.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        let Some(fft) = self.inner.as_deref_mut() else {
            out.extend_from_slice(input);
            return;
        };
        fft.pending
            .extend(input.iter().map(|&s| f32::from(s) / 32768.0));
        let mut start = 0;
        while fft.pending.len() - start >= fft.chunk_in {
            fft.input
                .copy_from_slice(&fft.pending[start..start + fft.chunk_in]);
            start += fft.chunk_in;
            match fft
                .resampler
                .process_into_buffer(&[&fft.input], &mut [&mut fft.output], None)
            {
                Ok((_, produced)) => out.extend(
                    fft.output[..produced]
                        .iter()
                        .map(|&s| (s * 32768.0).clamp(-32768.0, 32767.0) as i16),
                ),
                // Buffers are sized from the resampler's own figures, so this cannot happen;
                // if it did, emit silence rather than lose the timing.
                Err(_) => out.extend(std::iter::repeat_n(0, fft.output.len())),
            }
        }
        fft.pending.drain(..start);
    }

    /// Samples of delay the converter adds, at the output rate.
    pub fn delay(&self) -> usize {
        self.inner
            .as_ref()
            .map_or(0, |fft| fft.resampler.output_delay())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f32, samples: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| {
                ((i as f32 * hz * 2.0 * std::f32::consts::PI / rate as f32).sin() * 10_000.0) as i16
            })
            .collect()
    }

    /// Frequency estimate by zero crossings.
    fn crossings(samples: &[i16]) -> usize {
        samples
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count()
    }

    #[test]
    fn passthrough_when_equal() {
        let mut r = Resampler::new(16000, 16000).unwrap();
        assert!(r.is_passthrough());
        let mut out = Vec::new();
        r.process(&[1, 2, 3], &mut out);
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn converts_length_and_keeps_pitch() {
        for (from, to) in [(8000, 24000), (24000, 8000), (16000, 8000), (8000, 16000)] {
            let mut r = Resampler::new(from, to).unwrap();
            let input = tone(from, 440.0, from as usize); // one second
            let mut out = Vec::new();
            // Feed in odd-sized pieces: the remainder must carry over.
            for piece in input.chunks(123) {
                r.process(piece, &mut out);
            }
            assert_eq!(out.len(), to as usize, "{from}->{to}");
            // Skip the converter's start-up delay, then count crossings over 0.5 s.
            let skip = r.delay() + 100;
            let half = &out[skip..skip + to as usize / 2];
            let c = crossings(half) as i64;
            assert!((c - 440).abs() <= 4, "{from}->{to}: {c} crossings");
        }
    }
}
