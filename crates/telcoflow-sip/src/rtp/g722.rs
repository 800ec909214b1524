//! G.722 (ITU-T G.722, 64 kbit/s mode): 16 kHz mono 16-bit samples in, one byte per pair of
//! samples out, for RTP payload type 9.
//!
//! Sub-band ADPCM as the recommendation specifies it: a 24-tap QMF splits the signal into a
//! lower (0-4 kHz) and an upper (4-8 kHz) band at 8 kHz each; the lower band is coded with 6
//! bits (adapted from its upper 4), the upper with 2, each by a backward-adaptive predictor
//! (blocks 1-6 of G.722 section 3, named as there). Integer arithmetic throughout, with the
//! recommendation's saturations, so the output is the reference's bit for bit (tested
//! against FFmpeg's independent implementation in `tests/g722_ffmpeg.rs`, and against the
//! G.722 Appendix II digital test sequences in `tests/g722_itu.rs` when they are at hand).
//!
//! Written here rather than taken from a crate: `audio-codec` 0.4 starts both bands with scale
//! factors four times the reference's, so its streams differ from every other
//! implementation's from the first sample; `ezk-g722` pulls in the ezk media stack.
//!
//! Both halves are stateful: one encoder per sent stream and one decoder per received
//! stream, fed in stream order. Nothing allocates; the state is about 200 bytes.
//!
//! RTP carries G.722 with an 8000 Hz clock although it samples at 16 kHz (RFC 3551 4.5.2, an
//! error in RFC 1890 kept for compatibility): a 20 ms packet is 160 bytes and advances the
//! timestamp by 160, exactly as G.711 does.

/// Audio samples per second.
pub const SAMPLE_RATE: u32 = 16_000;

/// QMF coefficients (G.722 Table 11, one half of the symmetric 24 taps).
const QMF: [i32; 12] = [3, -11, 12, 32, -210, 951, 3876, -805, 362, -156, 53, -11];
/// Lower-band quantiser decision levels (Table 6, 6 bits).
const Q6: [i32; 32] = [
    0, 35, 72, 110, 150, 190, 233, 276, 323, 370, 422, 473, 530, 587, 650, 714, 786, 858, 940,
    1023, 1121, 1219, 1339, 1458, 1612, 1765, 1980, 2195, 2557, 2919, 0, 0,
];
/// Lower-band codes of negative and positive differences, by decision interval.
const ILN: [i32; 32] = [
    0, 63, 62, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
    10, 9, 8, 7, 6, 5, 4, 0,
];
const ILP: [i32; 32] = [
    0, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39,
    38, 37, 36, 35, 34, 33, 32, 0,
];
/// Lower-band inverse quantiser outputs, 4 bits (Table 7) and 6 bits (Table 6).
const QM4: [i32; 16] = [
    0, -20456, -12896, -8968, -6288, -4240, -2584, -1200, 20456, 12896, 8968, 6288, 4240, 2584,
    1200, 0,
];
const QM6: [i32; 64] = [
    -136, -136, -136, -136, -24808, -21904, -19008, -16704, -14984, -13512, -12280, -11192, -10232,
    -9360, -8576, -7856, -7192, -6576, -6000, -5456, -4944, -4464, -4008, -3576, -3168, -2776,
    -2400, -2032, -1688, -1360, -1040, -728, 24808, 21904, 19008, 16704, 14984, 13512, 12280,
    11192, 10232, 9360, 8576, 7856, 7192, 6576, 6000, 5456, 4944, 4464, 4008, 3576, 3168, 2776,
    2400, 2032, 1688, 1360, 1040, 728, 432, 136, -432, -136,
];
/// Lower-band scale factor multipliers (Table 14), by the 4-bit code's magnitude.
const WL: [i32; 8] = [-60, -30, 58, 172, 334, 538, 1198, 3042];
const RL42: [i32; 16] = [0, 7, 6, 5, 4, 3, 2, 1, 7, 6, 5, 4, 3, 2, 1, 0];
/// Inverse log table of the scale factor (Table 15).
const ILB: [i32; 32] = [
    2048, 2093, 2139, 2186, 2233, 2282, 2332, 2383, 2435, 2489, 2543, 2599, 2656, 2714, 2774, 2834,
    2896, 2960, 3025, 3091, 3158, 3228, 3298, 3371, 3444, 3520, 3597, 3676, 3756, 3838, 3922, 4008,
];
/// Upper-band codes, inverse quantiser outputs and scale factor multipliers (Tables 9, 16).
const IHN: [i32; 3] = [0, 1, 0];
const IHP: [i32; 3] = [0, 3, 2];
const QM2: [i32; 4] = [-7408, -1616, 7408, 1616];
const WH: [i32; 3] = [0, -214, 798];
const RH2: [i32; 4] = [2, 1, 2, 1];

fn saturate(x: i32) -> i32 {
    x.clamp(i32::from(i16::MIN), i32::from(i16::MAX))
}

/// One band's adaptive predictor and scale factor.
#[derive(Debug, Clone, Default)]
struct Band {
    /// Signal estimate (PREDIC), and its pole and zero parts.
    s: i32,
    sp: i32,
    sz: i32,
    /// Reconstructed signal, partial reconstruction, difference: now and before.
    r: [i32; 3],
    p: [i32; 3],
    d: [i32; 7],
    /// Pole and zero predictor coefficients (index 0 unused).
    a: [i32; 3],
    b: [i32; 7],
    /// Log scale factor (LOGSCL) and scale factor (SCALEL).
    nb: i32,
    det: i32,
}

impl Band {
    fn new(det: i32) -> Self {
        Self {
            det,
            ..Self::default()
        }
    }

    /// LOGSCL / LOGSCH then SCALEL / SCALEH: adapts the scale factor to the code's
    /// multiplier `w`, with the band's ceiling on `nb` and shift (8, 18432 lower; 10, 22528
    /// upper).
    fn adapt_scale(&mut self, w: i32, nb_max: i32, shift: i32) {
        self.nb = (((self.nb * 127) >> 7) + w).clamp(0, nb_max);
        let wd1 = (self.nb >> 6) & 31;
        let wd2 = shift - (self.nb >> 11);
        let wd3 = if wd2 < 0 {
            ILB[wd1 as usize] << -wd2
        } else {
            ILB[wd1 as usize] >> wd2
        };
        self.det = wd3 << 2;
    }

    /// Block 4: reconstruction, predictor adaptation (UPPOL2, UPPOL1, UPZERO), delays and
    /// the next signal estimate, from the quantised difference `dx`.
    fn block4(&mut self, dx: i32) {
        // RECONS, PARREC
        self.d[0] = dx;
        self.r[0] = saturate(self.s + dx);
        self.p[0] = saturate(self.sz + dx);
        // UPPOL2
        let sg0 = self.p[0] >> 15;
        let sg1 = self.p[1] >> 15;
        let sg2 = self.p[2] >> 15;
        let wd1 = saturate(self.a[1] << 2);
        let wd2 = if sg0 == sg1 { -wd1 } else { wd1 }.min(32767);
        let mut wd3 = if sg0 == sg2 { 128 } else { -128 };
        wd3 += wd2 >> 7;
        wd3 += (self.a[2] * 32512) >> 15;
        let ap2 = wd3.clamp(-12288, 12288);
        // UPPOL1
        let wd1 = if sg0 == sg1 { 192 } else { -192 };
        let wd2 = (self.a[1] * 32640) >> 15;
        let limit = saturate(15360 - ap2);
        let ap1 = saturate(wd1 + wd2).clamp(-limit, limit);
        // UPZERO: each coefficient from its own old value and the old difference it weighs.
        let step = if dx == 0 { 0 } else { 128 };
        let sg = dx >> 15;
        for (b, &d) in self.b.iter_mut().zip(&self.d).skip(1) {
            let wd2 = if d >> 15 == sg { step } else { -step };
            *b = saturate(wd2 + ((*b * 32640) >> 15));
        }
        // DELAYZ, DELAYL, DELAYA
        self.d.copy_within(0..6, 1);
        self.r.copy_within(0..2, 1);
        self.p.copy_within(0..2, 1);
        self.a[1] = ap1;
        self.a[2] = ap2;
        // FILTEP
        let wd1 = (self.a[1] * saturate(self.r[1] + self.r[1])) >> 15;
        let wd2 = (self.a[2] * saturate(self.r[2] + self.r[2])) >> 15;
        self.sp = saturate(wd1 + wd2);
        // FILTEZ
        let sz: i32 = self
            .b
            .iter()
            .zip(&self.d)
            .skip(1)
            .map(|(&b, &d)| (b * saturate(d + d)) >> 15)
            .sum();
        self.sz = saturate(sz);
        // PREDIC
        self.s = saturate(self.sp + self.sz);
    }
}

/// The two bands at their starting state (the reference's reset: scale factors 32 and 8).
fn bands() -> [Band; 2] {
    [Band::new(32), Band::new(8)]
}

/// G.722 encoder state for one stream.
#[derive(Debug, Clone)]
pub struct G722Encoder {
    /// QMF delay line: the last 24 input samples.
    x: [i32; 24],
    band: [Band; 2],
}

impl G722Encoder {
    /// A fresh encoder (64 kbit/s, one code per byte), in the reference's reset state.
    pub fn new() -> Self {
        Self {
            x: [0; 24],
            band: bands(),
        }
    }

    /// Encodes `pcm` (16 kHz) into `out`, one byte per two samples, and returns how many bytes
    /// were written. Only whole pairs are taken, and no more than `out` holds.
    pub fn encode(&mut self, pcm: &[i16], out: &mut [u8]) -> usize {
        let mut n = 0;
        for (pair, code) in pcm.chunks_exact(2).zip(out.iter_mut()) {
            *code = self.encode_pair(pair[0], pair[1]);
            n += 1;
        }
        n
    }

    fn encode_pair(&mut self, first: i16, second: i16) -> u8 {
        // Transmit QMF: split into the two bands, one sample of each per input pair.
        self.x.copy_within(2.., 0);
        self.x[22] = i32::from(first);
        self.x[23] = i32::from(second);
        let (mut sumodd, mut sumeven) = (0, 0);
        for i in 0..12 {
            sumodd += self.x[2 * i] * QMF[i];
            sumeven += self.x[2 * i + 1] * QMF[11 - i];
        }
        let xlow = (sumeven + sumodd) >> 14;
        let xhigh = (sumeven - sumodd) >> 14;
        self.encode_bands(xlow, xhigh)
    }

    /// Codes one lower-band and one upper-band sample (15-bit) with the QMF bypassed, as the
    /// digital test sequences of G.722 Appendix II drive the coder (`tests/g722_itu.rs`).
    /// Not for streams: [`encode`](Self::encode) is.
    #[doc(hidden)]
    pub fn encode_bands(&mut self, xlow: i32, xhigh: i32) -> u8 {
        // Lower band. SUBTRA, QUANTL.
        let low = &mut self.band[0];
        let el = saturate(xlow - low.s);
        let wd = if el >= 0 { el } else { -(el + 1) };
        let i = (1..30)
            .find(|&i| wd < (Q6[i] * low.det) >> 12)
            .unwrap_or(30);
        let ilow = if el < 0 { ILN[i] } else { ILP[i] };
        // INVQAL (from the upper 4 bits), LOGSCL, SCALEL, then block 4.
        let ril = (ilow >> 2) as usize;
        let dlow = (low.det * QM4[ril]) >> 15;
        low.adapt_scale(WL[RL42[ril] as usize], 18432, 8);
        low.block4(dlow);

        // Upper band. SUBTRA, QUANTH.
        let high = &mut self.band[1];
        let eh = saturate(xhigh - high.s);
        let wd = if eh >= 0 { eh } else { -(eh + 1) };
        let mih = if wd >= (564 * high.det) >> 12 { 2 } else { 1 };
        let ihigh = if eh < 0 { IHN[mih] } else { IHP[mih] };
        // INVQAH, LOGSCH, SCALEH, then block 4.
        let dhigh = (high.det * QM2[ihigh as usize]) >> 15;
        high.adapt_scale(WH[RH2[ihigh as usize] as usize], 22528, 10);
        high.block4(dhigh);

        ((ihigh << 6) | ilow) as u8
    }
}

impl Default for G722Encoder {
    fn default() -> Self {
        Self::new()
    }
}

/// G.722 decoder state for one stream.
#[derive(Debug, Clone)]
pub struct G722Decoder {
    /// QMF delay line: the last 12 pairs of band samples.
    x: [i32; 24],
    band: [Band; 2],
}

impl G722Decoder {
    /// A fresh decoder (64 kbit/s, one code per byte), in the reference's reset state.
    pub fn new() -> Self {
        Self {
            x: [0; 24],
            band: bands(),
        }
    }

    /// Decodes `bytes` into `out` (16 kHz), two samples per byte, and returns how many samples
    /// were written. Only as many bytes as `out` has room for are taken.
    pub fn decode(&mut self, bytes: &[u8], out: &mut [i16]) -> usize {
        let mut n = 0;
        for (&code, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
            let (first, second) = self.decode_code(code);
            pair[0] = first;
            pair[1] = second;
            n += 2;
        }
        n
    }

    fn decode_code(&mut self, code: u8) -> (i16, i16) {
        let (rlow, rhigh) = self.decode_bands(code);

        // Receive QMF: two output samples per pair of band samples.
        self.x.copy_within(2.., 0);
        self.x[22] = rlow + rhigh;
        self.x[23] = rlow - rhigh;
        let (mut xout1, mut xout2) = (0, 0);
        for i in 0..12 {
            xout2 += self.x[2 * i] * QMF[i];
            xout1 += self.x[2 * i + 1] * QMF[11 - i];
        }
        (saturate(xout1 >> 11) as i16, saturate(xout2 >> 11) as i16)
    }

    /// Decodes one code into its lower-band and upper-band samples (15-bit) with the QMF
    /// bypassed, as the digital test sequences of G.722 Appendix II check the decoder
    /// (`tests/g722_itu.rs`). Not for streams: [`decode`](Self::decode) is.
    #[doc(hidden)]
    pub fn decode_bands(&mut self, code: u8) -> (i32, i32) {
        let ilow = usize::from(code & 0x3F);
        let ihigh = usize::from(code >> 6);

        // Lower band. INVQBL (6 bits) and RECONS, LIMIT: the output.
        let low = &mut self.band[0];
        let rlow = (low.s + ((low.det * QM6[ilow]) >> 15)).clamp(-16384, 16383);
        // INVQAL (4 bits), LOGSCL, SCALEL, block 4: the predictor follows the encoder's.
        let ril = ilow >> 2;
        let dlow = (low.det * QM4[ril]) >> 15;
        low.adapt_scale(WL[RL42[ril] as usize], 18432, 8);
        low.block4(dlow);

        // Upper band. INVQAH, RECONS, LIMIT; LOGSCH, SCALEH, block 4.
        let high = &mut self.band[1];
        let dhigh = (high.det * QM2[ihigh]) >> 15;
        let rhigh = (dhigh + high.s).clamp(-16384, 16383);
        high.adapt_scale(WH[RH2[ihigh] as usize], 22528, 10);
        high.block4(dhigh);
        (rlow, rhigh)
    }
}

impl Default for G722Decoder {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(hz: f64, samples: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| {
                (8000.0 * (std::f64::consts::TAU * hz * i as f64 / f64::from(SAMPLE_RATE)).sin())
                    as i16
            })
            .collect()
    }

    /// Signal-to-noise ratio of `got` against `want`, in dB, after `delay` samples.
    fn snr_db(want: &[i16], got: &[i16], delay: usize) -> f64 {
        let (mut signal, mut noise) = (0.0f64, 0.0f64);
        for (w, g) in want.iter().zip(&got[delay..]) {
            signal += f64::from(*w).powi(2);
            noise += (f64::from(*w) - f64::from(*g)).powi(2);
        }
        10.0 * (signal / noise.max(1.0)).log10()
    }

    #[test]
    fn a_frame_is_160_bytes_and_round_trips_wideband() {
        // 5 kHz is above what 8 kHz sampling carries: only the upper sub-band keeps it.
        for hz in [440.0, 5000.0] {
            let pcm = tone(hz, 16_000);
            let (mut enc, mut dec) = (G722Encoder::new(), G722Decoder::new());
            let mut decoded = Vec::new();
            for frame in pcm.chunks(320) {
                let mut bytes = [0u8; 160];
                assert_eq!(enc.encode(frame, &mut bytes), 160);
                let mut out = [0i16; 320];
                assert_eq!(dec.decode(&bytes, &mut out), 320);
                decoded.extend_from_slice(&out);
            }
            // The QMF pair delays by 22 samples (G.722 2.2 and 4.4: 24-tap filters).
            let snr = snr_db(&pcm[..15_000], &decoded, 22);
            assert!(snr > 20.0, "{hz} Hz: SNR {snr:.1} dB");
        }
    }

    #[test]
    fn short_buffers_take_what_fits() {
        let mut enc = G722Encoder::new();
        let mut out = [0u8; 4];
        assert_eq!(enc.encode(&[0; 11], &mut out), 4);
        assert_eq!(enc.encode(&[0; 3], &mut out), 1);
        let mut dec = G722Decoder::new();
        let mut pcm = [0i16; 5];
        assert_eq!(dec.decode(&[0x55; 8], &mut pcm), 4);
        assert_eq!(dec.decode(&[], &mut pcm), 0);
    }
}
