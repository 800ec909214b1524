//! Reassembly of SIP messages from a TCP byte stream.
//!
//! Contract: [`StreamDecoder::extend`] with bytes as they are read; then call
//! [`StreamDecoder::next_item`] until it returns `Ok(None)` (more bytes needed). Each item is a
//! whole message (decode it with [`Message::parse`](super::message::Message::parse) or hand it
//! to [`Uas::handle_input`](super::uas::Uas::handle_input)) or a keep-alive to answer. An
//! error means the stream cannot be resynchronised (no Content-Length, oversized message):
//! close the connection. The buffer never holds more than
//! [`MAX_MESSAGE_LEN`] plus one read, and an unfinished
//! header section is held to the header limits
//! ([`MAX_HEADER_COUNT`](super::message::MAX_HEADER_COUNT),
//! [`MAX_HEADER_LINE_LEN`](super::message::MAX_HEADER_LINE_LEN)) while it arrives.

use bytes::{Buf as _, Bytes, BytesMut};

use super::message::{HeadLimits, MAX_MESSAGE_LEN, Measure, ParseError, measure};

/// One unit taken off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A whole message.
    Message(Bytes),
    /// A double-CRLF keep-alive ping (RFC 5626 4.4.1): answer with a single CRLF.
    Ping,
    /// A single-CRLF pong; nothing to do.
    Pong,
}

/// Accumulates stream bytes and cuts them into messages.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    buf: BytesMut,
    /// Length of the start of `buf` known to hold no end of headers. [`measure`] scans from
    /// the start, so without this a peer sending a long header a byte per read would make
    /// every read rescan all the bytes before it (quadratic time).
    searched: usize,
    /// The header limits of the unfinished header section in `buf[..searched]`, kept so that
    /// the shortcut past [`measure`] still enforces them on each new byte.
    head: HeadLimits,
    /// The length of the message at the start of `buf` once its header section is whole:
    /// while its body arrives, reads only compare lengths instead of measuring it again.
    need: Option<usize>,
}

/// Whether `buf` holds an end of headers (a blank line, CRLF or bare LF, as [`measure`]
/// reads it).
fn has_header_end(buf: &[u8]) -> bool {
    buf.windows(2).any(|w| w == b"\n\n") || buf.windows(4).any(|w| w == b"\r\n\r\n")
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self {
            // One typical INVITE with SDP fits without growing.
            buf: BytesMut::with_capacity(4096),
            searched: 0,
            head: HeadLimits::default(),
            need: None,
        }
    }

    /// Appends bytes read from the connection.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Whether part of a message (not just keep-alive CRLFs) is buffered, waiting for the
    /// rest: what a deadline for slow senders should watch.
    pub fn has_partial_message(&self) -> bool {
        self.buf.iter().any(|&b| b != b'\r' && b != b'\n')
    }

    /// The next whole item, `Ok(None)` if more bytes are needed.
    pub fn next_item(&mut self) -> Result<Option<StreamItem>, ParseError> {
        if let Some(need) = self.need {
            if self.buf.len() < need {
                return Ok(None);
            }
            self.need = None;
            return Ok(Some(StreamItem::Message(self.buf.split_to(need).freeze())));
        }
        if self.searched > 0 && self.buf.len() <= MAX_MESSAGE_LEN {
            // An end of headers among the new bytes starts at most 3 bytes before them.
            if !has_header_end(&self.buf[self.searched.saturating_sub(3)..]) {
                self.head.scan(&self.buf[self.searched..])?;
                self.searched = self.buf.len();
                return Ok(None);
            }
        }
        match measure(&self.buf)? {
            Measure::NoHeaderEnd => {
                // `measure` checked the whole buffer; from here on only new bytes are.
                self.head = HeadLimits::default();
                self.head.scan(&self.buf)?;
                self.searched = self.buf.len();
                Ok(None)
            }
            Measure::Total(total) if self.buf.len() < total => {
                self.searched = 0;
                self.need = Some(total);
                Ok(None)
            }
            Measure::Total(total) => {
                self.searched = 0;
                Ok(Some(StreamItem::Message(self.buf.split_to(total).freeze())))
            }
            Measure::KeepAlive(n) => {
                let ping = self.buf[..n].windows(4).any(|w| w == b"\r\n\r\n");
                // CRLFs at the end of the buffer may be a ping still arriving: wait until more
                // bytes show how the run ends (a pong needs no answer, so waiting costs nothing).
                if !ping && self.buf.len() == n {
                    // Only the last three bytes can still grow into a ping; keeping more would
                    // let a peer that streams CRs or LFs grow the buffer without bound.
                    if n <= 3 {
                        return Ok(None);
                    }
                    self.buf.advance(n - 3);
                    return Ok(Some(StreamItem::Pong));
                }
                self.buf.advance(n);
                self.searched = 0;
                Ok(Some(if ping {
                    StreamItem::Ping
                } else {
                    StreamItem::Pong
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{MAX_HEADER_COUNT, MAX_HEADER_LINE_LEN, Message};

    const OPTIONS: &[u8] = b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n\
Content-Length: 5\r\n\r\nhello";

    #[test]
    fn messages_split_across_reads_and_back_to_back() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"\r\n\r\n");
        stream.extend_from_slice(OPTIONS);
        stream.extend_from_slice(OPTIONS);
        stream.extend_from_slice(b"\r\n");
        let mut d = StreamDecoder::new();
        let mut items = Vec::new();
        // Feed in awkward 7-byte reads.
        for chunk in stream.chunks(7) {
            d.extend(chunk);
            while let Some(item) = d.next_item().unwrap() {
                items.push(item);
            }
        }
        // The trailing CRLF could still become a ping: it stays buffered.
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], StreamItem::Ping);
        for item in &items[1..3] {
            let StreamItem::Message(m) = item else {
                panic!("{item:?}");
            };
            assert_eq!(&m[..], OPTIONS);
            assert!(matches!(Message::parse(m).unwrap(), Message::Request(_)));
        }
        assert_eq!(d.buffered(), 2);
        assert!(!d.has_partial_message(), "a CRLF is no message");
        d.extend(&OPTIONS[..10]);
        assert!(d.has_partial_message());
    }

    #[test]
    fn unframeable_streams_are_errors() {
        let mut d = StreamDecoder::new();
        d.extend(b"OPTIONS sip:x SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(d.next_item(), Err(ParseError::MissingContentLength));
        let mut d = StreamDecoder::new();
        d.extend(&vec![b'A'; MAX_MESSAGE_LEN + 1]);
        assert_eq!(d.next_item(), Err(ParseError::HeaderLineTooLong));
    }

    #[test]
    fn a_ping_split_across_reads_is_one_ping() {
        let mut d = StreamDecoder::new();
        d.extend(b"\r");
        assert_eq!(d.next_item(), Ok(None));
        d.extend(b"\n");
        assert_eq!(d.next_item(), Ok(None));
        d.extend(b"\r\n");
        assert_eq!(d.next_item(), Ok(Some(StreamItem::Ping)));
        assert_eq!(d.next_item(), Ok(None));
        // A pong is reported once something follows it.
        d.extend(b"\r\n");
        assert_eq!(d.next_item(), Ok(None));
        d.extend(OPTIONS);
        assert_eq!(d.next_item(), Ok(Some(StreamItem::Pong)));
        assert!(matches!(d.next_item(), Ok(Some(StreamItem::Message(_)))));
    }

    #[test]
    fn a_run_of_line_ends_keeps_only_what_can_still_become_a_ping() {
        let mut d = StreamDecoder::new();
        d.extend(&[b'\n'; 10_000]);
        assert_eq!(d.next_item(), Ok(Some(StreamItem::Pong)));
        assert_eq!(d.next_item(), Ok(None));
        assert_eq!(d.buffered(), 3);
        // The kept tail still completes a ping split across reads.
        let mut d = StreamDecoder::new();
        d.extend(b"\r\r\r\n\r");
        assert_eq!(d.next_item(), Ok(Some(StreamItem::Pong)));
        assert_eq!(d.next_item(), Ok(None));
        d.extend(b"\nX");
        assert_eq!(d.next_item(), Ok(Some(StreamItem::Ping)));
    }

    #[test]
    fn a_header_trickled_a_byte_per_read_is_scanned_once() {
        // Every read used to rescan the whole buffer: 64 KiB a byte at a time took minutes.
        let mut d = StreamDecoder::new();
        let mut head = b"OPTIONS sip:x SIP/2.0\r\n".to_vec();
        while head.len() < MAX_MESSAGE_LEN {
            // Lines within the header limits, so that only the size limit applies.
            head.extend_from_slice(b"X: ");
            head.extend_from_slice(&[b'a'; 1000]);
            head.extend_from_slice(b"\r\n");
        }
        head.truncate(MAX_MESSAGE_LEN);
        for byte in &head {
            d.extend(&[*byte]);
            assert_eq!(d.next_item(), Ok(None));
        }
        d.extend(b"a");
        assert_eq!(d.next_item(), Err(ParseError::TooLarge));
        // The header limits still hold for bytes that skip the full scan.
        let mut d = StreamDecoder::new();
        d.extend(b"OPTIONS sip:x SIP/2.0\r\nX: ");
        assert_eq!(d.next_item(), Ok(None));
        let mut result = Ok(None);
        for _ in 0..=MAX_HEADER_LINE_LEN {
            d.extend(b"a");
            result = d.next_item();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ParseError::HeaderLineTooLong));
        let mut d = StreamDecoder::new();
        d.extend(b"OPTIONS sip:x SIP/2.0\r\n");
        assert_eq!(d.next_item(), Ok(None));
        let mut result = Ok(None);
        for _ in 0..=MAX_HEADER_COUNT {
            d.extend(b"X: y\r\n");
            result = d.next_item();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ParseError::TooManyHeaders));
        // The end of headers (bytes 76..80) is still found when it straddles two reads.
        let mut d = StreamDecoder::new();
        d.extend(&OPTIONS[..78]);
        assert_eq!(d.next_item(), Ok(None));
        d.extend(&OPTIONS[78..]);
        assert_eq!(
            d.next_item(),
            Ok(Some(StreamItem::Message(Bytes::from_static(OPTIONS))))
        );
    }

    #[test]
    fn a_body_trickled_a_byte_per_read_frames_once_whole() {
        let (head, body) = OPTIONS.split_at(OPTIONS.len() - 5);
        let mut d = StreamDecoder::new();
        d.extend(head);
        assert_eq!(d.next_item(), Ok(None));
        assert_eq!(d.need, Some(OPTIONS.len()), "the length is known once");
        for byte in &body[..body.len() - 1] {
            d.extend(&[*byte]);
            assert_eq!(d.next_item(), Ok(None));
        }
        // The last body byte and the start of the next message arrive together.
        d.extend(&body[body.len() - 1..]);
        d.extend(&OPTIONS[..30]);
        assert_eq!(
            d.next_item(),
            Ok(Some(StreamItem::Message(Bytes::from_static(OPTIONS))))
        );
        assert_eq!(d.need, None);
        assert_eq!(d.next_item(), Ok(None));
        d.extend(&OPTIONS[30..]);
        assert_eq!(
            d.next_item(),
            Ok(Some(StreamItem::Message(Bytes::from_static(OPTIONS))))
        );
        assert_eq!(d.buffered(), 0);
    }
}
