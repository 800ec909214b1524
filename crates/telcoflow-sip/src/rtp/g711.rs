//! G.711 companding (ITU-T G.711): PCMU (mu-law, RTP payload type 0) and PCMA (A-law, payload
//! type 8) for 8 kHz mono 16-bit samples.
//!
//! Decoding is a lookup in 256-entry tables computed at compile time. Encoding follows the
//! segment search of the recommendation directly: it is a handful of integer operations per
//! sample, cheaper in cache than a 64 K-entry table. Nothing here allocates; the slice
//! functions write into buffers the caller owns so a media loop can reuse them per frame.

/// Which G.711 law a payload uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum G711 {
    /// mu-law, RTP static payload type 0 (North America, Japan).
    Pcmu,
    /// A-law, RTP static payload type 8 (rest of the world).
    Pcma,
}

impl G711 {
    /// Clock rate of both laws, in Hz.
    pub const CLOCK_RATE: u32 = 8000;

    /// The static RTP payload type (RFC 3551).
    pub fn payload_type(self) -> u8 {
        match self {
            Self::Pcmu => 0,
            Self::Pcma => 8,
        }
    }

    /// The law for a static payload type, if it is one of the two.
    pub fn from_payload_type(pt: u8) -> Option<Self> {
        match pt {
            0 => Some(Self::Pcmu),
            8 => Some(Self::Pcma),
            _ => None,
        }
    }

    /// The SDP `rtpmap` encoding name.
    pub fn encoding_name(self) -> &'static str {
        match self {
            Self::Pcmu => "PCMU",
            Self::Pcma => "PCMA",
        }
    }

    /// The byte that encodes silence (0) in this law; useful to fill concealed frames.
    pub fn silence_byte(self) -> u8 {
        match self {
            Self::Pcmu => 0xFF,
            Self::Pcma => 0xD5,
        }
    }

    /// Encodes one sample.
    pub fn encode_sample(self, sample: i16) -> u8 {
        match self {
            Self::Pcmu => ulaw_encode(sample),
            Self::Pcma => alaw_encode(sample),
        }
    }

    /// Decodes one byte.
    pub fn decode_sample(self, byte: u8) -> i16 {
        match self {
            Self::Pcmu => ULAW_DECODE[byte as usize],
            Self::Pcma => ALAW_DECODE[byte as usize],
        }
    }

    /// Encodes `pcm` into `out`, one byte per sample, and returns how many were written
    /// (the shorter of the two lengths).
    pub fn encode(self, pcm: &[i16], out: &mut [u8]) -> usize {
        let n = pcm.len().min(out.len());
        match self {
            Self::Pcmu => {
                for (o, &s) in out.iter_mut().zip(pcm) {
                    *o = ulaw_encode(s);
                }
            }
            Self::Pcma => {
                for (o, &s) in out.iter_mut().zip(pcm) {
                    *o = alaw_encode(s);
                }
            }
        }
        n
    }

    /// Decodes `payload` into `out`, one sample per byte, and returns how many were written
    /// (the shorter of the two lengths).
    pub fn decode(self, payload: &[u8], out: &mut [i16]) -> usize {
        let n = payload.len().min(out.len());
        let table = match self {
            Self::Pcmu => &ULAW_DECODE,
            Self::Pcma => &ALAW_DECODE,
        };
        for (o, &b) in out.iter_mut().zip(payload) {
            *o = table[b as usize];
        }
        n
    }
}

/// Bias added before the mu-law segment search (G.711 works on 14-bit magnitudes; this is
/// the same bias, 33, scaled to 16-bit input).
const ULAW_BIAS: i32 = 0x84;
/// Largest magnitude that still fits after adding the bias.
const ULAW_CLIP: i32 = 32635;

/// Encodes one 16-bit sample as mu-law.
pub fn ulaw_encode(sample: i16) -> u8 {
    let mut s = i32::from(sample);
    let sign: u8 = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(ULAW_CLIP) + ULAW_BIAS;
    // s is in 0x84..=0x7FFF, so its top set bit is bit 7..=14 and the segment 0..=7.
    let top_bit = 31 - s.leading_zeros() as i32;
    let exponent = (top_bit - 7) as u8;
    let mantissa = ((s >> (exponent + 3)) & 0x0F) as u8;
    !(sign | (exponent << 4) | mantissa)
}

const fn ulaw_decode(byte: u8) -> i16 {
    let u = !byte;
    let exponent = (u >> 4) & 0x07;
    let mantissa = (u & 0x0F) as i32;
    let magnitude = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS;
    if u & 0x80 != 0 {
        -magnitude as i16
    } else {
        magnitude as i16
    }
}

/// Upper bounds of the eight A-law segments on 13-bit magnitudes.
const ALAW_SEG_END: [i32; 8] = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF];

/// Encodes one 16-bit sample as A-law.
pub fn alaw_encode(sample: i16) -> u8 {
    // A-law is defined on 13-bit samples.
    let mut v = i32::from(sample) >> 3;
    let mask: u8 = if v >= 0 {
        0xD5
    } else {
        v = -v - 1;
        0x55
    };
    let Some(seg) = ALAW_SEG_END.iter().position(|&end| v <= end) else {
        return 0x7F ^ mask;
    };
    let mantissa = if seg < 2 {
        (v >> 1) & 0x0F
    } else {
        (v >> seg) & 0x0F
    };
    (((seg as u8) << 4) | mantissa as u8) ^ mask
}

const fn alaw_decode(byte: u8) -> i16 {
    let a = byte ^ 0x55;
    let mut t = ((a & 0x0F) as i32) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    if a & 0x80 != 0 { t as i16 } else { -t as i16 }
}

const fn build_table(law: G711) -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = match law {
            G711::Pcmu => ulaw_decode(i as u8),
            G711::Pcma => alaw_decode(i as u8),
        };
        i += 1;
    }
    table
}

static ULAW_DECODE: [i16; 256] = build_table(G711::Pcmu);
static ALAW_DECODE: [i16; 256] = build_table(G711::Pcma);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_known_values() {
        assert_eq!(ulaw_encode(0), 0xFF);
        assert_eq!(G711::Pcmu.decode_sample(0xFF), 0);
        assert_eq!(G711::Pcmu.decode_sample(0x7F), 0);
        assert_eq!(G711::Pcmu.decode_sample(0x80), 32124);
        assert_eq!(G711::Pcmu.decode_sample(0x00), -32124);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(ulaw_encode(-1), 0x7F);
        // First segment: steps of 8 (on the 16-bit scale) above zero.
        assert_eq!(G711::Pcmu.decode_sample(0xFE), 8);
        assert_eq!(G711::Pcmu.decode_sample(0xEF), 132);
    }

    #[test]
    fn alaw_known_values() {
        assert_eq!(alaw_encode(0), 0xD5);
        assert_eq!(alaw_encode(-1), 0x55);
        assert_eq!(G711::Pcma.decode_sample(0xD5), 8);
        assert_eq!(G711::Pcma.decode_sample(0x55), -8);
        assert_eq!(G711::Pcma.decode_sample(0xAA), 32256);
        assert_eq!(G711::Pcma.decode_sample(0x2A), -32256);
        assert_eq!(alaw_encode(i16::MAX), 0xAA);
        assert_eq!(alaw_encode(i16::MIN), 0x2A);
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            let pcm = G711::Pcma.decode_sample(code);
            assert_eq!(alaw_encode(pcm), code, "A-law code {code:#04x}");
            let pcm = G711::Pcmu.decode_sample(code);
            // 0x7F is mu-law's negative zero; it decodes to 0, which encodes as 0xFF.
            let expected = if code == 0x7F { 0xFF } else { code };
            assert_eq!(ulaw_encode(pcm), expected, "mu-law code {code:#04x}");
        }
    }

    #[test]
    fn quantisation_error_is_bounded_and_monotonic() {
        for law in [G711::Pcmu, G711::Pcma] {
            let mut previous = i16::MIN;
            for s in i16::MIN..=i16::MAX {
                let back = law.decode_sample(law.encode_sample(s));
                assert!(back >= previous, "{law:?} not monotonic at {s}");
                previous = back;
                // The step doubles per segment; half the largest step (1024 for A-law,
                // 1024 for mu-law) bounds the error, and small signals stay precise.
                let err = (i32::from(back) - i32::from(s)).abs();
                let bound = (i32::from(s).abs() / 16).max(16) + 16;
                assert!(err <= bound, "{law:?}: {s} -> {back} (err {err})");
            }
        }
    }

    #[test]
    fn slice_codec_round_trips_a_tone() {
        let pcm: Vec<i16> = (0..160)
            .map(|i| ((i as f32 * 0.3).sin() * 12000.0) as i16)
            .collect();
        for law in [G711::Pcmu, G711::Pcma] {
            let mut bytes = [0u8; 160];
            assert_eq!(law.encode(&pcm, &mut bytes), 160);
            let mut back = [0i16; 160];
            assert_eq!(law.decode(&bytes, &mut back), 160);
            for (a, b) in pcm.iter().zip(back.iter()) {
                assert!((i32::from(*a) - i32::from(*b)).abs() < 400, "{law:?}");
            }
        }
    }

    #[test]
    fn slice_functions_stop_at_the_shorter_buffer() {
        let mut out = [0u8; 4];
        assert_eq!(G711::Pcmu.encode(&[0; 10], &mut out), 4);
        let mut pcm = [1i16; 10];
        assert_eq!(G711::Pcma.decode(&[0xD5; 3], &mut pcm), 3);
        assert_eq!(pcm[3], 1);
    }

    #[test]
    fn payload_types() {
        assert_eq!(G711::from_payload_type(0), Some(G711::Pcmu));
        assert_eq!(G711::from_payload_type(8), Some(G711::Pcma));
        assert_eq!(G711::from_payload_type(18), None);
        for law in [G711::Pcmu, G711::Pcma] {
            assert_eq!(G711::from_payload_type(law.payload_type()), Some(law));
            assert!(law.decode_sample(law.silence_byte()).abs() <= 8);
        }
    }
}
