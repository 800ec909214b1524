//! Splits and joins received G.711 packets of any length into 20 ms frames, by timestamp.
//!
//! The jitter buffer holds [`FRAME_SAMPLES`]-sample frames keyed by sequence number. A phone
//! that packetises at another `ptime` (10, 30, 40 ms...) sends payloads of other lengths: each
//! is cut at the 20 ms boundaries of the stream's timestamp grid (frame `i` holds the samples
//! from `base + 160 i`), and a frame is handed on once every one of its samples has arrived,
//! as a packet whose sequence number is `s + i` (mod 2^16), `s` being the sequence number of
//! the packet the grid started from, and whose timestamp is the frame's first sample. A
//! phone that sent 20 ms packets (played as they are) and switches to another `ptime` thus
//! continues its own sequence numbers: the jitter buffer sees one stream. Arrival order does not matter within [`SLOTS`] frames; a frame that never
//! completes (a piece was lost) is dropped when its slot is needed, and the jitter buffer
//! conceals it. No sample is lost or cut.
//!
//! Sans-IO, no allocation after [`Reframer::default`].

use super::jitter::FRAME_SAMPLES;
use super::packet::{RtpHeader, RtpPacket};

/// Frames being assembled at once (160 ms: reordering within that span is absorbed).
pub const SLOTS: usize = 8;
/// A timestamp this far (in frames) from the grid's base starts a new grid: the stream
/// restarted (RFC 3550 A.1's dropout bound, in frames).
const MAX_JUMP_FRAMES: i64 = 3000;

#[derive(Debug, Clone, Copy)]
struct Partial {
    index: u32,
    live: bool,
    count: usize,
    filled: [bool; FRAME_SAMPLES],
    bytes: [u8; FRAME_SAMPLES],
}

impl Default for Partial {
    fn default() -> Self {
        Self {
            index: 0,
            live: false,
            count: 0,
            filled: [false; FRAME_SAMPLES],
            bytes: [0; FRAME_SAMPLES],
        }
    }
}

/// Re-frames one received stream into 20 ms frames. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct Reframer {
    /// The stream's SSRC, the timestamp of its frame 0 and the sequence number given to it.
    grid: Option<(u32, u32, u16)>,
    slots: [Partial; SLOTS],
}

impl Reframer {
    /// Takes one audio packet; calls `emit` with each 20 ms frame it completes, in the
    /// order they complete.
    pub fn push(&mut self, packet: &RtpPacket<'_>, mut emit: impl FnMut(&RtpPacket<'_>)) {
        let h = &packet.header;
        let payload = packet.payload;
        let frame = FRAME_SAMPLES as i64;
        let mut rel = match self.grid {
            Some((ssrc, base, _)) if ssrc == h.ssrc => {
                i64::from(h.timestamp.wrapping_sub(base) as i32)
            }
            _ => {
                self.restart(h);
                0
            }
        };
        if rel < -(SLOTS as i64) * frame || rel > MAX_JUMP_FRAMES * frame {
            self.restart(h);
            rel = 0;
        }
        let (base, first_seq) = self
            .grid
            .map_or((h.timestamp, h.sequence), |(_, b, s)| (b, s));
        let mut k = 0usize;
        while k < payload.len() {
            let pos = rel + k as i64;
            if pos < 0 {
                // Samples before frame 0 of the grid (reordered ahead of the first packet).
                k += usize::try_from(-pos)
                    .unwrap_or(usize::MAX)
                    .min(payload.len() - k);
                continue;
            }
            let index = (pos / frame) as u32;
            let offset = (pos % frame) as usize;
            let n = (FRAME_SAMPLES - offset).min(payload.len() - k);
            let slot = &mut self.slots[index as usize % SLOTS];
            if !slot.live || slot.index != index {
                // A frame still missing pieces in this slot is given up: it is lost.
                *slot = Partial {
                    index,
                    live: true,
                    ..Partial::default()
                };
            }
            for (j, &byte) in payload[k..k + n].iter().enumerate() {
                if !slot.filled[offset + j] {
                    slot.filled[offset + j] = true;
                    slot.bytes[offset + j] = byte;
                    slot.count += 1;
                }
            }
            if slot.count == FRAME_SAMPLES {
                slot.live = false;
                let mut header = RtpHeader::new(
                    h.payload_type,
                    first_seq.wrapping_add(index as u16),
                    base.wrapping_add(index.wrapping_mul(FRAME_SAMPLES as u32)),
                    h.ssrc,
                );
                header.marker = false;
                emit(&RtpPacket {
                    header,
                    extension: None,
                    padding: 0,
                    payload: &slot.bytes,
                });
            }
            k += n;
        }
    }

    fn restart(&mut self, h: &RtpHeader) {
        self.grid = Some((h.ssrc, h.timestamp, h.sequence));
        for slot in &mut self.slots {
            slot.live = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet of `len` samples from sample `start` of a counting stream (byte = sample % 251).
    fn packet(start: u32, len: usize, buf: &mut Vec<u8>) -> RtpPacket<'_> {
        buf.clear();
        buf.extend((0..len).map(|i| ((start as usize + i) % 251) as u8));
        RtpPacket {
            header: RtpHeader::new(0, 0, 1000 + start, 7),
            extension: None,
            padding: 0,
            payload: buf,
        }
    }

    fn run(packets: &[(u32, usize)]) -> Vec<(u16, u32, Vec<u8>)> {
        let mut r = Reframer::default();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for &(start, len) in packets {
            r.push(&packet(start, len, &mut buf), |p| {
                out.push((p.header.sequence, p.header.timestamp, p.payload.to_vec()));
            });
        }
        out
    }

    fn expected(index: u32) -> Vec<u8> {
        (0..160)
            .map(|i| ((index as usize * 160 + i) % 251) as u8)
            .collect()
    }

    #[test]
    fn every_ptime_from_10_to_60_ms_gives_whole_frames_without_loss() {
        for ptime in (10..=60).step_by(5) {
            let len = ptime * 8;
            let packets: Vec<_> = (0..24u32).map(|i| (i * len as u32, len)).collect();
            let frames = run(&packets);
            let total = 24 * len / 160;
            assert_eq!(frames.len(), total, "ptime {ptime}");
            for (i, (seq, ts, bytes)) in frames.iter().enumerate() {
                assert_eq!(*seq, i as u16, "ptime {ptime}");
                assert_eq!(*ts, 1000 + 160 * i as u32);
                assert_eq!(*bytes, expected(i as u32), "ptime {ptime} frame {i}");
            }
        }
    }

    #[test]
    fn reordered_pieces_join_and_a_lost_piece_loses_only_its_frames() {
        // 30 ms packets: 0..240, 240..480, 480..720, 720..960; the second and third swap,
        // then one is lost.
        let frames = run(&[(0, 240), (480, 240), (240, 240), (720, 240), (1200, 240)]);
        let seqs: Vec<u16> = frames.iter().map(|f| f.0).collect();
        assert_eq!(seqs, vec![0, 3, 1, 2, 4, 5, 8]);
        for (seq, _, bytes) in &frames {
            assert_eq!(*bytes, expected(u32::from(*seq)));
        }
        // 960..1200 never came: frames 6 and 7 (960..1280) are incomplete and not emitted;
        // frame 8 (1280..1440) is whole.
        let frames = run(&[(0, 240), (240, 240), (480, 240), (720, 240), (1200, 240)]);
        let seqs: Vec<u16> = frames.iter().map(|f| f.0).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5, 8]);
    }

    #[test]
    fn a_new_ssrc_or_a_jump_starts_a_new_grid() {
        let mut r = Reframer::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        r.push(&packet(0, 240, &mut buf), |p| out.push(p.header.sequence));
        let mut p = packet(80, 240, &mut buf);
        p.header.ssrc = 8;
        r.push(&p, |p| out.push(p.header.sequence));
        assert_eq!(
            out,
            vec![0, 0],
            "the new source's first packet is its frame 0"
        );
        let mut out = Vec::new();
        let mut p = packet(10_000_000, 160, &mut buf);
        p.header.ssrc = 8;
        r.push(&p, |p| out.push(p.header.sequence));
        assert_eq!(out, vec![0]);
    }
}
