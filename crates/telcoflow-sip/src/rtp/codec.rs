//! The audio codecs a SIP leg can negotiate: G.711 (PCMU, PCMA) at 8 kHz and G.722 at 16 kHz.
//!
//! All three use an 8000 Hz RTP clock and one payload byte per timestamp unit (G.722: RFC 3551
//! 4.5.2), so a 20 ms frame is 160 bytes and 160 timestamp units whichever is used; they
//! differ in the samples that frame holds ([`Codec::frame_samples`]).

use super::g711::G711;
use super::g722::{self, G722Encoder};

/// Payload bytes (and RTP timestamp units) in one 20 ms frame, for every codec here.
pub const FRAME_BYTES: usize = 160;

/// Samples in one 20 ms frame of the widest codec (G.722, 16 kHz).
pub const MAX_FRAME_SAMPLES: usize = 320;

/// An audio codec of a SIP leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// G.711 mu-law, static payload type 0.
    Pcmu,
    /// G.711 A-law, static payload type 8.
    Pcma,
    /// G.722 at 64 kbit/s, static payload type 9: wideband (16 kHz).
    G722,
}

impl Codec {
    /// RTP clock rate of every codec here, in Hz (G.722's too: RFC 3551 4.5.2).
    pub const CLOCK_RATE: u32 = 8000;

    /// Every codec, in the default order of preference (narrowband first).
    pub const ALL: [Self; 3] = [Self::Pcmu, Self::Pcma, Self::G722];

    /// The static RTP payload type (RFC 3551).
    pub fn payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
            Self::G722 => 9,
        }
    }

    /// The codec of a static payload type.
    pub fn from_payload_type(pt: u8) -> Option<Self> {
        match pt {
            0 => Some(Self::Pcmu),
            8 => Some(Self::Pcma),
            9 => Some(Self::G722),
            _ => None,
        }
    }

    /// The SDP `rtpmap` encoding name.
    pub fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
            Self::G722 => "G722",
        }
    }

    /// The codec an encoding name stands for (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| name.eq_ignore_ascii_case(c.encoding_name()))
    }

    /// Audio samples per second.
    pub fn sample_rate(self) -> u32 {
        match self {
            Self::Pcmu | Self::Pcma => G711::CLOCK_RATE,
            Self::G722 => g722::SAMPLE_RATE,
        }
    }

    /// Samples in one 20 ms frame.
    pub fn frame_samples(self) -> usize {
        self.sample_rate() as usize / 50
    }

    /// Audio samples per payload byte (and per RTP timestamp unit).
    pub fn samples_per_byte(self) -> usize {
        self.sample_rate() as usize / Self::CLOCK_RATE as usize
    }

    /// Whether this is wideband (16 kHz) rather than narrowband (8 kHz).
    pub fn is_wideband(self) -> bool {
        self.sample_rate() > G711::CLOCK_RATE
    }

    /// The G.711 law, for PCMU and PCMA.
    pub fn g711(self) -> Option<G711> {
        match self {
            Self::Pcmu => Some(G711::Pcmu),
            Self::Pcma => Some(G711::Pcma),
            Self::G722 => None,
        }
    }
}

impl From<G711> for Codec {
    fn from(law: G711) -> Self {
        match law {
            G711::Pcmu => Self::Pcmu,
            G711::Pcma => Self::Pcma,
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.encoding_name())
    }
}

/// Encoder state of one sent stream: G.711 has none, G.722 adapts as it goes.
#[derive(Debug)]
pub enum AudioEncoder {
    /// PCMU or PCMA.
    G711(G711),
    /// G.722.
    G722(Box<G722Encoder>),
}

impl AudioEncoder {
    /// A fresh encoder for `codec`.
    pub fn new(codec: Codec) -> Self {
        match codec.g711() {
            Some(law) => Self::G711(law),
            None => Self::G722(Box::default()),
        }
    }

    /// Encodes `pcm` (at the codec's rate) into `out`; returns the bytes written.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> usize {
        match self {
            Self::G711(law) => law.encode(pcm, out),
            Self::G722(enc) => enc.encode(pcm, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtp::g722::G722Decoder;

    #[test]
    fn payload_types_names_and_rates() {
        for c in Codec::ALL {
            assert_eq!(Codec::from_payload_type(c.payload_type()), Some(c));
            assert_eq!(Codec::from_name(&c.encoding_name().to_lowercase()), Some(c));
            assert_eq!(c.frame_samples(), FRAME_BYTES * c.samples_per_byte());
        }
        assert_eq!(Codec::G722.frame_samples(), MAX_FRAME_SAMPLES);
        assert!(Codec::G722.is_wideband() && !Codec::Pcma.is_wideband());
        assert_eq!(Codec::from_payload_type(18), None);
        assert_eq!(Codec::from_name("G729"), None);
    }

    #[test]
    fn a_frame_is_160_bytes_for_each_codec() {
        for c in Codec::ALL {
            let pcm = vec![1000i16; c.frame_samples()];
            let mut bytes = [0u8; FRAME_BYTES];
            assert_eq!(AudioEncoder::new(c).encode(&pcm, &mut bytes), FRAME_BYTES);
            let mut out = [0i16; MAX_FRAME_SAMPLES];
            // The jitter buffer decodes per slot (a slot may be PCMU or PCMA).
            let decoded = match c.g711() {
                Some(law) => law.decode(&bytes, &mut out),
                None => G722Decoder::default().decode(&bytes, &mut out),
            };
            assert_eq!(decoded, c.frame_samples());
        }
    }
}
