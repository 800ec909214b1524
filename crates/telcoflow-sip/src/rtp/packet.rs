//! RTP and RTCP wire formats (RFC 3550) and RFC 4733 telephone events.
//!
//! Contract: parsing borrows from the datagram and never allocates for RTP (a call's hot path
//! parses 50 packets a second); every length is checked before it is read, so any byte string
//! yields either a packet or a typed [`PacketError`], never a panic. Writers fill a buffer the
//! caller owns and return the number of bytes written. RTCP is read in place too
//! ([`RtcpPackets`], [`RtcpView`]); the owned [`RtcpPacket`]s, with small `Vec`s for their report
//! blocks, are for callers that keep what they parsed.

/// RTP version this module speaks (RFC 3550).
pub const RTP_VERSION: u8 = 2;
/// Fixed RTP header length, before CSRCs and extension.
pub const RTP_HEADER_LEN: usize = 12;
/// RTCP payload type of a sender report.
pub const RTCP_SR: u8 = 200;
/// RTCP payload type of a receiver report.
pub const RTCP_RR: u8 = 201;
/// RTCP payload type of source description items.
pub const RTCP_SDES: u8 = 202;
/// RTCP payload type of a goodbye.
pub const RTCP_BYE: u8 = 203;

/// Why bytes are not a valid RTP/RTCP packet, or a packet does not fit a buffer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    /// Fewer bytes than the structure being read needs.
    #[error("packet too short: need {needed} bytes, have {have}")]
    TooShort {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// The version field is not 2.
    #[error("unsupported RTP version {0}")]
    BadVersion(u8),
    /// The padding count is zero or larger than the payload.
    #[error("invalid padding length {0}")]
    BadPadding(u8),
    /// An RTCP length field points past the datagram.
    #[error("RTCP length {words} words exceeds the {have} bytes left")]
    BadRtcpLength {
        /// The length field (32-bit words minus one).
        words: u16,
        /// Bytes left in the datagram.
        have: usize,
    },
    /// An RTCP packet type that cannot appear first in a compound packet or is not RTCP.
    #[error("not an RTCP packet type: {0}")]
    NotRtcp(u8),
    /// The output buffer is too small.
    #[error("output buffer too small: need {needed} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// More than 15 CSRCs or 31 report blocks.
    #[error("too many entries: {0}")]
    TooMany(usize),
    /// SRTP could not protect a packet to send.
    #[error("SRTP: {0}")]
    Srtp(String),
}

fn need(buf: &[u8], needed: usize) -> Result<(), PacketError> {
    if buf.len() < needed {
        Err(PacketError::TooShort {
            needed,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn room(buf: &[u8], needed: usize) -> Result<(), PacketError> {
    if buf.len() < needed {
        Err(PacketError::BufferTooSmall {
            needed,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The fixed RTP header plus CSRCs; extension and padding are exposed by [`RtpPacket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtpHeader {
    /// Marker bit (first packet of a talk spurt, or of a DTMF event).
    pub marker: bool,
    /// Payload type (7 bits).
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp in clock-rate units.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// Number of valid entries in `csrcs`.
    pub csrc_count: u8,
    /// Contributing sources; only the first `csrc_count` are meaningful.
    pub csrcs: [u32; 15],
}

impl RtpHeader {
    /// A header with no CSRCs.
    pub fn new(payload_type: u8, sequence: u16, timestamp: u32, ssrc: u32) -> Self {
        Self {
            payload_type: payload_type & 0x7F,
            sequence,
            timestamp,
            ssrc,
            ..Self::default()
        }
    }

    /// The contributing sources present.
    pub fn csrcs(&self) -> &[u32] {
        &self.csrcs[..usize::from(self.csrc_count.min(15))]
    }

    /// Length of this header on the wire.
    pub fn len(&self) -> usize {
        RTP_HEADER_LEN + 4 * usize::from(self.csrc_count.min(15))
    }

    /// Always false: a header has at least 12 bytes (here for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the header (no padding, no extension) and returns its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, PacketError> {
        if self.csrc_count > 15 {
            return Err(PacketError::TooMany(usize::from(self.csrc_count)));
        }
        let len = self.len();
        room(out, len)?;
        out[0] = (RTP_VERSION << 6) | self.csrc_count;
        out[1] = (u8::from(self.marker) << 7) | (self.payload_type & 0x7F);
        out[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        out[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        for (i, csrc) in self.csrcs().iter().enumerate() {
            out[12 + 4 * i..16 + 4 * i].copy_from_slice(&csrc.to_be_bytes());
        }
        Ok(len)
    }

    /// Writes header and payload into `out` and returns the packet length.
    pub fn write_packet(&self, payload: &[u8], out: &mut [u8]) -> Result<usize, PacketError> {
        let total = self.len() + payload.len();
        room(out, total)?;
        let n = self.write(out)?;
        out[n..total].copy_from_slice(payload);
        Ok(total)
    }
}

/// A header extension (RFC 3550 5.3.1): profile-defined id and its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpExtension<'a> {
    /// The 16-bit profile-defined field.
    pub profile: u16,
    /// Extension data (a multiple of 4 bytes).
    pub data: &'a [u8],
}

/// A parsed RTP packet borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The header.
    pub header: RtpHeader,
    /// The header extension, if the X bit was set.
    pub extension: Option<RtpExtension<'a>>,
    /// Number of padding bytes removed from the end (0 if the P bit was clear).
    pub padding: u8,
    /// The payload, without padding.
    pub payload: &'a [u8],
}

impl<'a> RtpPacket<'a> {
    /// Parses one RTP packet.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PacketError> {
        need(buf, RTP_HEADER_LEN)?;
        let version = buf[0] >> 6;
        if version != RTP_VERSION {
            return Err(PacketError::BadVersion(version));
        }
        let has_padding = buf[0] & 0x20 != 0;
        let has_extension = buf[0] & 0x10 != 0;
        let csrc_count = buf[0] & 0x0F;
        let mut header = RtpHeader {
            marker: buf[1] & 0x80 != 0,
            payload_type: buf[1] & 0x7F,
            sequence: be16(buf, 2),
            timestamp: be32(buf, 4),
            ssrc: be32(buf, 8),
            csrc_count,
            csrcs: [0; 15],
        };
        let mut at = RTP_HEADER_LEN;
        need(buf, at + 4 * usize::from(csrc_count))?;
        for i in 0..usize::from(csrc_count) {
            header.csrcs[i] = be32(buf, at);
            at += 4;
        }
        let mut extension = None;
        if has_extension {
            need(buf, at + 4)?;
            let profile = be16(buf, at);
            let words = usize::from(be16(buf, at + 2));
            at += 4;
            need(buf, at + 4 * words)?;
            extension = Some(RtpExtension {
                profile,
                data: &buf[at..at + 4 * words],
            });
            at += 4 * words;
        }
        let mut end = buf.len();
        let mut padding = 0;
        if has_padding {
            // The last byte counts the padding, itself included.
            padding = buf[end - 1];
            if padding == 0 || usize::from(padding) > end - at {
                return Err(PacketError::BadPadding(padding));
            }
            end -= usize::from(padding);
        }
        Ok(Self {
            header,
            extension,
            padding,
            payload: &buf[at..end],
        })
    }
}

/// Quick classification of a datagram on a shared RTP/RTCP port (RFC 5761 section 4):
/// RTCP packet types 200..=204 land in the RTP payload-type range 72..=76 with the marker set.
pub fn is_rtcp(buf: &[u8]) -> bool {
    buf.len() >= 2 && buf[0] >> 6 == RTP_VERSION && (192..=223).contains(&buf[1])
}

/// An RFC 4733 telephone event (DTMF digit or tone) payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// Event code: 0-9 digits, 10 `*`, 11 `#`, 12-15 `A`-`D`.
    pub event: u8,
    /// End bit: the last packet(s) of the event.
    pub end: bool,
    /// Volume in -dBm0 (0..=63).
    pub volume: u8,
    /// Duration so far, in timestamp units (8 kHz for G.711 calls).
    pub duration: u16,
}

impl TelephoneEvent {
    /// Payload length on the wire.
    pub const LEN: usize = 4;

    /// Parses the first event of a payload (redundant later blocks are ignored).
    pub fn parse(payload: &[u8]) -> Result<Self, PacketError> {
        need(payload, Self::LEN)?;
        Ok(Self {
            event: payload[0],
            end: payload[1] & 0x80 != 0,
            volume: payload[1] & 0x3F,
            duration: be16(payload, 2),
        })
    }

    /// Writes the 4-byte payload.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, PacketError> {
        room(out, Self::LEN)?;
        out[0] = self.event;
        out[1] = (u8::from(self.end) << 7) | (self.volume & 0x3F);
        out[2..4].copy_from_slice(&self.duration.to_be_bytes());
        Ok(Self::LEN)
    }

    /// The DTMF character for events 0-15, `None` for other tones.
    pub fn digit(&self) -> Option<char> {
        event_to_digit(self.event)
    }
}

/// The DTMF character of an RFC 4733 event code.
pub fn event_to_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + event - 12)),
        _ => None,
    }
}

/// The RFC 4733 event code of a DTMF character.
pub fn digit_to_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => Some(digit as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(digit as u8 - b'A' + 12),
        'a'..='d' => Some(digit as u8 - b'a' + 12),
        _ => None,
    }
}

/// A finished DTMF digit reported by [`DtmfReceiver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtmf {
    /// The digit character.
    pub digit: char,
    /// How long the key was held, in milliseconds.
    pub duration_ms: u32,
}

/// Turns a stream of telephone-event packets into one [`Dtmf`] per key press.
///
/// Senders repeat the end packet (usually three times) and all packets of one event share an
/// RTP timestamp; this reports each event once, on its first end packet.
#[derive(Debug, Clone, Default)]
pub struct DtmfReceiver {
    last_reported: Option<u32>,
}

impl DtmfReceiver {
    /// Feeds one telephone-event packet; `clock_rate` converts the duration.
    pub fn handle(
        &mut self,
        timestamp: u32,
        event: &TelephoneEvent,
        clock_rate: u32,
    ) -> Option<Dtmf> {
        if !event.end || self.last_reported == Some(timestamp) {
            return None;
        }
        self.last_reported = Some(timestamp);
        let digit = event.digit()?;
        let duration_ms = u32::from(event.duration) * 1000 / clock_rate.max(1);
        Some(Dtmf { digit, duration_ms })
    }
}

/// A reception report block (RFC 3550 6.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReportBlock {
    /// The source this block reports on.
    pub ssrc: u32,
    /// Fraction of packets lost since the last report, in 1/256 units.
    pub fraction_lost: u8,
    /// Cumulative packets lost (24-bit signed on the wire).
    pub cumulative_lost: i32,
    /// Extended highest sequence number received (cycles << 16 | highest).
    pub highest_sequence: u32,
    /// Interarrival jitter, in timestamp units.
    pub jitter: u32,
    /// Middle 32 bits of the NTP timestamp of the last SR received from the source.
    pub last_sr: u32,
    /// Delay since that SR, in 1/65536 seconds.
    pub delay_since_last_sr: u32,
}

impl ReportBlock {
    /// Length on the wire.
    pub const LEN: usize = 24;

    fn parse(b: &[u8]) -> Self {
        // Sign-extend the 24-bit cumulative count.
        let raw = (u32::from(b[5]) << 16) | (u32::from(b[6]) << 8) | u32::from(b[7]);
        let cumulative_lost = ((raw << 8) as i32) >> 8;
        Self {
            ssrc: be32(b, 0),
            fraction_lost: b[4],
            cumulative_lost,
            highest_sequence: be32(b, 8),
            jitter: be32(b, 12),
            last_sr: be32(b, 16),
            delay_since_last_sr: be32(b, 20),
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.ssrc.to_be_bytes());
        out[4] = self.fraction_lost;
        let lost = self.cumulative_lost.clamp(-0x80_0000, 0x7F_FFFF) as u32;
        out[5..8].copy_from_slice(&lost.to_be_bytes()[1..4]);
        out[8..12].copy_from_slice(&self.highest_sequence.to_be_bytes());
        out[12..16].copy_from_slice(&self.jitter.to_be_bytes());
        out[16..20].copy_from_slice(&self.last_sr.to_be_bytes());
        out[20..24].copy_from_slice(&self.delay_since_last_sr.to_be_bytes());
    }
}

/// An RTCP sender report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SenderReport {
    /// The sender.
    pub ssrc: u32,
    /// 64-bit NTP wallclock time of this report.
    pub ntp_timestamp: u64,
    /// The RTP timestamp matching `ntp_timestamp`.
    pub rtp_timestamp: u32,
    /// Packets sent since the start.
    pub packet_count: u32,
    /// Payload octets sent since the start.
    pub octet_count: u32,
    /// Reception reports about sources the sender hears.
    pub reports: Vec<ReportBlock>,
}

/// An RTCP receiver report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceiverReport {
    /// The reporter.
    pub ssrc: u32,
    /// Reception reports.
    pub reports: Vec<ReportBlock>,
}

/// One packet of an RTCP compound datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RtcpPacket {
    /// A sender report.
    SenderReport(SenderReport),
    /// A receiver report.
    ReceiverReport(ReceiverReport),
    /// Another RTCP type (SDES, BYE, APP, feedback), skipped.
    Other {
        /// Its packet type.
        packet_type: u8,
    },
}

impl RtcpPacket {
    /// Parses every packet of a compound RTCP datagram.
    pub fn parse_compound(buf: &[u8]) -> Result<Vec<Self>, PacketError> {
        RtcpPackets::new(buf)
            .map(|view| view.map(|v| v.to_packet()))
            .collect()
    }
}

/// The packets of a compound RTCP datagram, read in place: no allocation, so that a call's
/// receiving side costs none. Yields each packet, or the error that ends the datagram (after
/// which it yields nothing).
#[derive(Debug, Clone)]
pub struct RtcpPackets<'a> {
    rest: &'a [u8],
}

impl<'a> RtcpPackets<'a> {
    /// The packets of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// Checks every packet of `buf` without keeping any: `Ok` when
    /// [`RtcpPacket::parse_compound`] would succeed.
    pub fn validate(buf: &'a [u8]) -> Result<(), PacketError> {
        Self::new(buf).try_for_each(|p| p.map(drop))
    }
}

impl<'a> Iterator for RtcpPackets<'a> {
    type Item = Result<RtcpView<'a>, PacketError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match RtcpView::split(self.rest) {
            Ok((view, rest)) => {
                self.rest = rest;
                Some(Ok(view))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// One packet of a compound RTCP datagram, borrowed from it. Sender and receiver reports are
/// long enough for the report blocks their header counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpView<'a> {
    packet_type: u8,
    /// The header's count field (report blocks of an SR or RR).
    count: usize,
    /// What follows the 4-byte header, up to the packet's length.
    body: &'a [u8],
}

impl<'a> RtcpView<'a> {
    /// The first packet of `buf` and the bytes after it.
    fn split(buf: &'a [u8]) -> Result<(Self, &'a [u8]), PacketError> {
        need(buf, 4)?;
        let version = buf[0] >> 6;
        if version != RTP_VERSION {
            return Err(PacketError::BadVersion(version));
        }
        let count = usize::from(buf[0] & 0x1F);
        let packet_type = buf[1];
        if !(192..=223).contains(&packet_type) {
            return Err(PacketError::NotRtcp(packet_type));
        }
        let words = be16(buf, 2);
        let len = (usize::from(words) + 1) * 4;
        if len > buf.len() {
            return Err(PacketError::BadRtcpLength {
                words,
                have: buf.len(),
            });
        }
        let body = &buf[4..len];
        match packet_type {
            RTCP_SR => need(body, 24 + count * ReportBlock::LEN)?,
            RTCP_RR => need(body, 4 + count * ReportBlock::LEN)?,
            _ => {}
        }
        let view = Self {
            packet_type,
            count,
            body,
        };
        Ok((view, &buf[len..]))
    }

    /// The packet type ([`RTCP_SR`], [`RTCP_RR`], ...).
    pub fn packet_type(&self) -> u8 {
        self.packet_type
    }

    /// The NTP timestamp of a sender report; `None` for other packets.
    pub fn ntp_timestamp(&self) -> Option<u64> {
        (self.packet_type == RTCP_SR)
            .then(|| (u64::from(be32(self.body, 4)) << 32) | u64::from(be32(self.body, 8)))
    }

    /// The report blocks of a sender or receiver report (none for other packets).
    pub fn report_blocks(&self) -> impl Iterator<Item = ReportBlock> + 'a {
        let blocks: &'a [u8] = match self.packet_type {
            RTCP_SR => &self.body[24..],
            RTCP_RR => &self.body[4..],
            _ => &[],
        };
        blocks
            .chunks_exact(ReportBlock::LEN)
            .take(self.count)
            .map(ReportBlock::parse)
    }

    /// The packet as an owned [`RtcpPacket`].
    pub fn to_packet(&self) -> RtcpPacket {
        let b = self.body;
        match self.packet_type {
            RTCP_SR => RtcpPacket::SenderReport(SenderReport {
                ssrc: be32(b, 0),
                ntp_timestamp: (u64::from(be32(b, 4)) << 32) | u64::from(be32(b, 8)),
                rtp_timestamp: be32(b, 12),
                packet_count: be32(b, 16),
                octet_count: be32(b, 20),
                reports: self.report_blocks().collect(),
            }),
            RTCP_RR => RtcpPacket::ReceiverReport(ReceiverReport {
                ssrc: be32(b, 0),
                reports: self.report_blocks().collect(),
            }),
            other => RtcpPacket::Other { packet_type: other },
        }
    }
}

fn write_rtcp_header(out: &mut [u8], count: usize, packet_type: u8, len: usize) {
    out[0] = (RTP_VERSION << 6) | (count as u8 & 0x1F);
    out[1] = packet_type;
    out[2..4].copy_from_slice(&((len / 4 - 1) as u16).to_be_bytes());
}

impl SenderReport {
    /// Writes this report and returns its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, PacketError> {
        if self.reports.len() > 31 {
            return Err(PacketError::TooMany(self.reports.len()));
        }
        let len = 28 + self.reports.len() * ReportBlock::LEN;
        room(out, len)?;
        write_rtcp_header(out, self.reports.len(), RTCP_SR, len);
        out[4..8].copy_from_slice(&self.ssrc.to_be_bytes());
        out[8..16].copy_from_slice(&self.ntp_timestamp.to_be_bytes());
        out[16..20].copy_from_slice(&self.rtp_timestamp.to_be_bytes());
        out[20..24].copy_from_slice(&self.packet_count.to_be_bytes());
        out[24..28].copy_from_slice(&self.octet_count.to_be_bytes());
        for (i, r) in self.reports.iter().enumerate() {
            r.write(&mut out[28 + i * ReportBlock::LEN..]);
        }
        Ok(len)
    }
}

impl ReceiverReport {
    /// Writes this report and returns its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, PacketError> {
        if self.reports.len() > 31 {
            return Err(PacketError::TooMany(self.reports.len()));
        }
        let len = 8 + self.reports.len() * ReportBlock::LEN;
        room(out, len)?;
        write_rtcp_header(out, self.reports.len(), RTCP_RR, len);
        out[4..8].copy_from_slice(&self.ssrc.to_be_bytes());
        for (i, r) in self.reports.iter().enumerate() {
            r.write(&mut out[8 + i * ReportBlock::LEN..]);
        }
        Ok(len)
    }
}

/// Writes an SDES packet with one CNAME item, which RFC 3550 6.1 requires in every compound
/// RTCP packet, and returns its length. A CNAME longer than 255 bytes is truncated.
pub fn write_sdes_cname(ssrc: u32, cname: &str, out: &mut [u8]) -> Result<usize, PacketError> {
    let name = &cname.as_bytes()[..cname.len().min(255)];
    // SSRC, CNAME type + length + text, then at least one null byte, padded to 32 bits.
    let items = 4 + 2 + name.len() + 1;
    let len = 4 + items.div_ceil(4) * 4;
    room(out, len)?;
    write_rtcp_header(out, 1, RTCP_SDES, len);
    out[4..8].copy_from_slice(&ssrc.to_be_bytes());
    out[8] = 1; // CNAME
    out[9] = name.len() as u8;
    out[10..10 + name.len()].copy_from_slice(name);
    out[10 + name.len()..len].fill(0);
    Ok(len)
}

/// Converts a duration since the Unix epoch to the 64-bit NTP timestamp format used in SRs.
pub fn ntp_timestamp(since_unix_epoch: std::time::Duration) -> u64 {
    const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
    let secs = since_unix_epoch.as_secs() + NTP_UNIX_OFFSET;
    let frac = (u64::from(since_unix_epoch.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtp_round_trip() {
        let mut h = RtpHeader::new(8, 65535, 0xDEAD_BEEF, 0x1234_5678);
        h.marker = true;
        h.csrc_count = 2;
        h.csrcs[0] = 7;
        h.csrcs[1] = 9;
        let payload = [0xD5u8; 160];
        let mut buf = [0u8; 1500];
        let n = h.write_packet(&payload, &mut buf).unwrap();
        assert_eq!(n, 12 + 8 + 160);
        let p = RtpPacket::parse(&buf[..n]).unwrap();
        assert_eq!(p.header, h);
        assert_eq!(p.header.csrcs(), &[7, 9]);
        assert_eq!(p.payload, &payload[..]);
        assert_eq!(p.extension, None);
        assert_eq!(p.padding, 0);
    }

    #[test]
    fn rtp_known_bytes() {
        // V=2, no P/X/CC, M=1, PT=0, seq 1, ts 160, ssrc 0x01020304, two payload bytes.
        let bytes = [
            0x80, 0x80, 0x00, 0x01, 0x00, 0x00, 0x00, 0xA0, 1, 2, 3, 4, 0xFF, 0x7F,
        ];
        let p = RtpPacket::parse(&bytes).unwrap();
        assert!(p.header.marker);
        assert_eq!(p.header.payload_type, 0);
        assert_eq!(p.header.sequence, 1);
        assert_eq!(p.header.timestamp, 160);
        assert_eq!(p.header.ssrc, 0x0102_0304);
        assert_eq!(p.payload, &[0xFF, 0x7F]);
        let mut out = [0u8; 14];
        assert_eq!(p.header.write_packet(p.payload, &mut out).unwrap(), 14);
        assert_eq!(out, bytes);
    }

    #[test]
    fn rtp_extension_and_padding() {
        let mut b = vec![0xB0, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        b.extend_from_slice(&[0xBE, 0xDE, 0, 1, 0xAA, 0xBB, 0xCC, 0xDD]);
        b.extend_from_slice(&[1, 2, 3]);
        b.extend_from_slice(&[0, 0, 3]);
        let p = RtpPacket::parse(&b).unwrap();
        let ext = p.extension.unwrap();
        assert_eq!(ext.profile, 0xBEDE);
        assert_eq!(ext.data, &[0xAA, 0xBB, 0xCC, 0xDD]);
        assert_eq!(p.padding, 3);
        assert_eq!(p.payload, &[1, 2, 3]);
    }

    #[test]
    fn rtp_malformed_is_an_error() {
        assert!(matches!(
            RtpPacket::parse(&[0x80; 11]),
            Err(PacketError::TooShort { needed: 12, .. })
        ));
        let mut v1 = [0u8; 12];
        v1[0] = 0x40;
        assert_eq!(RtpPacket::parse(&v1), Err(PacketError::BadVersion(1)));
        // CSRC count 3 but no CSRCs.
        let mut cc = [0u8; 12];
        cc[0] = 0x83;
        assert!(matches!(
            RtpPacket::parse(&cc),
            Err(PacketError::TooShort { .. })
        ));
        // Extension header announced but absent, then length past the end.
        let mut x = [0u8; 16];
        x[0] = 0x90;
        x[14] = 0;
        x[15] = 9;
        assert!(matches!(
            RtpPacket::parse(&x[..14]),
            Err(PacketError::TooShort { .. })
        ));
        assert!(matches!(
            RtpPacket::parse(&x),
            Err(PacketError::TooShort { .. })
        ));
        // Padding of zero, and padding larger than the payload.
        let mut p = [0u8; 14];
        p[0] = 0xA0;
        assert_eq!(RtpPacket::parse(&p), Err(PacketError::BadPadding(0)));
        p[13] = 3;
        assert_eq!(RtpPacket::parse(&p), Err(PacketError::BadPadding(3)));
        p[13] = 2;
        assert_eq!(RtpPacket::parse(&p).unwrap().payload.len(), 0);
    }

    #[test]
    fn rtp_parse_never_panics_on_short_prefixes_and_noise() {
        let mut seed = 0x1234_5678u32;
        let mut buf = [0u8; 64];
        for _ in 0..20_000 {
            for b in buf.iter_mut() {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (seed >> 24) as u8;
            }
            let len = (seed as usize) % buf.len();
            let _ = RtpPacket::parse(&buf[..len]);
            let _ = RtcpPacket::parse_compound(&buf[..len]);
            let _ = TelephoneEvent::parse(&buf[..len]);
        }
    }

    #[test]
    fn write_reports_small_buffers() {
        let h = RtpHeader::new(0, 0, 0, 0);
        assert!(matches!(
            h.write_packet(&[0; 160], &mut [0u8; 100]),
            Err(PacketError::BufferTooSmall { needed: 172, .. })
        ));
    }

    #[test]
    fn telephone_event_round_trip_and_known_bytes() {
        // Digit 5, end, volume 10, duration 960.
        let bytes = [5, 0x8A, 0x03, 0xC0];
        let e = TelephoneEvent::parse(&bytes).unwrap();
        assert_eq!(
            e,
            TelephoneEvent {
                event: 5,
                end: true,
                volume: 10,
                duration: 960
            }
        );
        assert_eq!(e.digit(), Some('5'));
        let mut out = [0u8; 4];
        e.write(&mut out).unwrap();
        assert_eq!(out, bytes);
        assert!(TelephoneEvent::parse(&bytes[..3]).is_err());
    }

    #[test]
    fn dtmf_digit_mapping() {
        for (code, c) in (0u8..16).zip("0123456789*#ABCD".chars()) {
            assert_eq!(event_to_digit(code), Some(c));
            assert_eq!(digit_to_event(c), Some(code));
        }
        assert_eq!(event_to_digit(16), None);
        assert_eq!(digit_to_event('x'), None);
    }

    #[test]
    fn dtmf_receiver_reports_once_per_event() {
        let mut rx = DtmfReceiver::default();
        let mut ev = TelephoneEvent {
            event: 11,
            end: false,
            volume: 10,
            duration: 160,
        };
        assert_eq!(rx.handle(1000, &ev, 8000), None);
        ev.end = true;
        ev.duration = 960;
        let d = rx.handle(1000, &ev, 8000).unwrap();
        assert_eq!(
            d,
            Dtmf {
                digit: '#',
                duration_ms: 120
            }
        );
        // Retransmitted end packets are ignored.
        assert_eq!(rx.handle(1000, &ev, 8000), None);
        assert_eq!(rx.handle(1000, &ev, 8000), None);
        // The next press has a new timestamp.
        assert!(rx.handle(5000, &ev, 8000).is_some());
    }

    #[test]
    fn rtcp_compound_round_trip() {
        let block = ReportBlock {
            ssrc: 42,
            fraction_lost: 25,
            cumulative_lost: -3,
            highest_sequence: 0x0001_0005,
            jitter: 77,
            last_sr: 0x1234_5678,
            delay_since_last_sr: 65536,
        };
        let sr = SenderReport {
            ssrc: 1,
            ntp_timestamp: 0x0102_0304_0506_0708,
            rtp_timestamp: 160,
            packet_count: 10,
            octet_count: 1600,
            reports: vec![block],
        };
        let rr = ReceiverReport {
            ssrc: 2,
            reports: vec![block, ReportBlock { ssrc: 43, ..block }],
        };
        let mut buf = [0u8; 512];
        let mut n = sr.write(&mut buf).unwrap();
        assert_eq!(n, 52);
        n += write_sdes_cname(1, "telcoflow@host", &mut buf[n..]).unwrap();
        n += rr.write(&mut buf[n..]).unwrap();
        assert!(is_rtcp(&buf[..n]));
        let parsed = RtcpPacket::parse_compound(&buf[..n]).unwrap();
        assert_eq!(
            parsed,
            vec![
                RtcpPacket::SenderReport(sr),
                RtcpPacket::Other {
                    packet_type: RTCP_SDES
                },
                RtcpPacket::ReceiverReport(rr),
            ]
        );
    }

    #[test]
    fn rtcp_malformed_is_an_error() {
        let rr = ReceiverReport {
            ssrc: 2,
            reports: vec![ReportBlock::default()],
        };
        let mut buf = [0u8; 64];
        let n = rr.write(&mut buf).unwrap();
        assert!(matches!(
            RtcpPacket::parse_compound(&buf[..n - 4]),
            Err(PacketError::BadRtcpLength { .. })
        ));
        // Report count says 2 blocks but the length holds one.
        buf[0] = 0x82;
        assert!(matches!(
            RtcpPacket::parse_compound(&buf[..n]),
            Err(PacketError::TooShort { .. })
        ));
        assert_eq!(
            RtcpPacket::parse_compound(&[0x80, 0x00, 0, 0]),
            Err(PacketError::NotRtcp(0))
        );
        assert!(!is_rtcp(&[0x80, 0x00, 0, 0]));
    }

    #[test]
    fn rtcp_views_read_reports_in_place() {
        let block = ReportBlock {
            ssrc: 42,
            cumulative_lost: -3,
            jitter: 77,
            ..ReportBlock::default()
        };
        let sr = SenderReport {
            ssrc: 1,
            ntp_timestamp: 0x0102_0304_0506_0708,
            reports: vec![block],
            ..SenderReport::default()
        };
        let rr = ReceiverReport {
            ssrc: 2,
            reports: vec![ReportBlock { ssrc: 43, ..block }, block],
        };
        let mut buf = [0u8; 512];
        let mut n = sr.write(&mut buf).unwrap();
        n += write_sdes_cname(1, "telcoflow@host", &mut buf[n..]).unwrap();
        n += rr.write(&mut buf[n..]).unwrap();
        assert_eq!(RtcpPackets::validate(&buf[..n]), Ok(()));
        let views: Vec<RtcpView<'_>> = RtcpPackets::new(&buf[..n])
            .collect::<Result<_, _>>()
            .unwrap();
        let types: Vec<u8> = views.iter().map(RtcpView::packet_type).collect();
        assert_eq!(types, [RTCP_SR, RTCP_SDES, RTCP_RR]);
        assert_eq!(views[0].ntp_timestamp(), Some(sr.ntp_timestamp));
        assert_eq!(views[2].ntp_timestamp(), None);
        assert_eq!(views[0].report_blocks().collect::<Vec<_>>(), sr.reports);
        assert_eq!(views[1].report_blocks().count(), 0);
        assert_eq!(views[2].report_blocks().collect::<Vec<_>>(), rr.reports);
        assert_eq!(views[2].to_packet(), RtcpPacket::ReceiverReport(rr));
    }

    #[test]
    fn rtcp_views_end_at_the_first_malformed_packet() {
        let rr = ReceiverReport {
            ssrc: 2,
            reports: vec![ReportBlock::default()],
        };
        let mut buf = [0u8; 128];
        let n = rr.write(&mut buf).unwrap();
        // A second packet whose count says 2 blocks but whose length holds one.
        buf.copy_within(..n, n);
        buf[n] = 0x82;
        let mut packets = RtcpPackets::new(&buf[..2 * n]);
        assert!(matches!(packets.next(), Some(Ok(v)) if v.packet_type() == RTCP_RR));
        assert!(matches!(
            packets.next(),
            Some(Err(PacketError::TooShort { .. }))
        ));
        assert!(packets.next().is_none());
        assert!(matches!(
            RtcpPackets::validate(&buf[..2 * n]),
            Err(PacketError::TooShort { .. })
        ));
    }

    #[test]
    fn ntp_conversion() {
        let t = ntp_timestamp(std::time::Duration::from_millis(1500));
        assert_eq!(t >> 32, 2_208_988_801);
        assert_eq!(t & 0xFFFF_FFFF, 1 << 31);
    }
}
