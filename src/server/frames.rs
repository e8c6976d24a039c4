//! The client's WebSocket frames as they arrive, before tungstenite puts
//! them together into messages: every frame (text, binary, continuation,
//! ping, pong and close) counts against the connection's message rate, and a
//! message sent in pieces may have only so many of them and must be whole
//! within a time. tungstenite hands the server only whole messages, so a
//! flood of empty pongs or of the pieces of a message that never ends would
//! otherwise cost the server their parsing without ever being seen.
//!
//! [`FrameGuard`] sits between the upgraded connection and tungstenite and
//! reads the frame headers in the bytes as they pass (it skips payloads, so
//! its cost is per frame, not per byte). A frame over a limit fails the read
//! with an [`io::Error`] carrying a [`FrameViolation`], which the connection
//! turns into its close frame.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The most frames one message may come in (its first frame and its
/// continuations). Browsers send a message as one frame.
pub(crate) const MAX_MESSAGE_FRAMES: u32 = 64;
/// How long a message sent in pieces may take from its first frame to its
/// last.
pub(crate) const MAX_MESSAGE_TIME: Duration = Duration::from_secs(5);

/// A token bucket: `rate` per second, bursts of `burst`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes `cost` tokens at `now`, or none if there are not as many.
    pub(crate) fn take_at(&mut self, cost: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = self.last.max(now);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// Why the guard ended a connection; the error inside the failed read.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum FrameViolation {
    /// More frames than the message rate allows.
    Rate { rate: f64, burst: u32 },
    /// A message in more than [`MAX_MESSAGE_FRAMES`] pieces.
    TooManyPieces,
    /// A message in pieces not whole within [`MAX_MESSAGE_TIME`].
    TooSlow,
}

impl std::fmt::Display for FrameViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameViolation::Rate { rate, burst } => write!(
                f,
                "message rate exceeded: more than {rate} frames per second (burst {burst})"
            ),
            FrameViolation::TooManyPieces => write!(
                f,
                "message in too many pieces: at most {MAX_MESSAGE_FRAMES} frames per message"
            ),
            FrameViolation::TooSlow => write!(
                f,
                "message in pieces not whole within {}",
                humantime::format_duration(MAX_MESSAGE_TIME)
            ),
        }
    }
}

impl std::error::Error for FrameViolation {}

impl FrameViolation {
    /// The violation inside an error from a read of the guard, if that is
    /// what failed it.
    pub(crate) fn of(e: &io::Error) -> Option<&FrameViolation> {
        e.get_ref()?.downcast_ref()
    }
}

/// Where the header reader is in the byte stream.
#[derive(Debug)]
enum At {
    /// In a frame header: the bytes of it read so far.
    Header { bytes: [u8; 14], have: u8 },
    /// In a payload: the bytes of it still to skip.
    Payload(u64),
}

/// Reads the frame headers of a client's byte stream and applies the limits.
#[derive(Debug)]
pub(crate) struct FrameCounter {
    at: At,
    rate: Bucket,
    rate_per_second: f64,
    burst: u32,
    /// Frames of the message in pieces being received, and when its first
    /// came; 0 between messages.
    pieces: u32,
    started: Instant,
}

impl FrameCounter {
    /// `rate` frames per second on average, bursts of `burst`.
    pub(crate) fn new(rate: f64, burst: u32) -> FrameCounter {
        FrameCounter {
            at: At::Header {
                bytes: [0; 14],
                have: 0,
            },
            rate: Bucket::new(rate, f64::from(burst)),
            rate_per_second: rate,
            burst,
            pieces: 0,
            started: Instant::now(),
        }
    }

    /// Reads `data`, the next bytes of the stream, received at `now`.
    pub(crate) fn feed(&mut self, mut data: &[u8], now: Instant) -> Result<(), FrameViolation> {
        while !data.is_empty() {
            match &mut self.at {
                At::Payload(left) => {
                    let skip = (*left).min(data.len() as u64);
                    *left -= skip;
                    data = &data[skip as usize..];
                    if *left == 0 {
                        self.at = At::Header {
                            bytes: [0; 14],
                            have: 0,
                        };
                    }
                }
                At::Header { bytes, have } => {
                    let needed = header_len(&bytes[..usize::from(*have)]);
                    let want = needed - usize::from(*have);
                    let take = want.min(data.len());
                    bytes[usize::from(*have)..usize::from(*have) + take]
                        .copy_from_slice(&data[..take]);
                    *have += take as u8;
                    data = &data[take..];
                    // The length may have grown once the second byte is in.
                    if usize::from(*have) < header_len(&bytes[..usize::from(*have)]) {
                        continue;
                    }
                    let header = *bytes;
                    let payload = payload_len(&header);
                    self.at = if payload == 0 {
                        At::Header {
                            bytes: [0; 14],
                            have: 0,
                        }
                    } else {
                        At::Payload(payload)
                    };
                    self.frame(header[0], now)?;
                }
            }
        }
        Ok(())
    }

    /// One whole frame header whose first byte is `first`.
    fn frame(&mut self, first: u8, now: Instant) -> Result<(), FrameViolation> {
        if !self.rate.take_at(1.0, now) {
            return Err(FrameViolation::Rate {
                rate: self.rate_per_second,
                burst: self.burst,
            });
        }
        let fin = first & 0x80 != 0;
        match first & 0x0f {
            // A continuation: the next piece of the message in pieces.
            0x0 if self.pieces > 0 => {
                self.pieces += 1;
                if self.pieces > MAX_MESSAGE_FRAMES {
                    return Err(FrameViolation::TooManyPieces);
                }
                if now.saturating_duration_since(self.started) > MAX_MESSAGE_TIME {
                    return Err(FrameViolation::TooSlow);
                }
                if fin {
                    self.pieces = 0;
                }
            }
            // The first piece of a message in pieces.
            0x1 | 0x2 if !fin => {
                self.pieces = 1;
                self.started = now;
            }
            // Whole messages, control frames (which may come between the
            // pieces of a message), and what tungstenite refuses itself (a
            // continuation of nothing, a new message before the last ended,
            // reserved opcodes).
            _ => {}
        }
        Ok(())
    }
}

/// The length of a header whose first bytes are `have`: 2 until the second
/// byte is known, then 2, plus 2 or 8 for an extended length, plus 4 for a
/// mask.
fn header_len(have: &[u8]) -> usize {
    let Some(&second) = have.get(1) else {
        return 2;
    };
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length of a whole header.
fn payload_len(header: &[u8; 14]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes([
            header[2], header[3], header[4], header[5], header[6], header[7], header[8], header[9],
        ]),
        n => u64::from(n),
    }
}

/// A client connection whose reads go through a [`FrameCounter`]; writes
/// pass through untouched.
#[derive(Debug)]
pub(crate) struct FrameGuard<S> {
    inner: S,
    counter: FrameCounter,
    /// Set once a limit was passed: every later read fails the same way.
    failed: Option<FrameViolation>,
}

impl<S> FrameGuard<S> {
    pub(crate) fn new(inner: S, counter: FrameCounter) -> FrameGuard<S> {
        FrameGuard {
            inner,
            counter,
            failed: None,
        }
    }
}

super::write_through!(impl[S: AsyncWrite + Unpin] FrameGuard<S>, inner);

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(v) = &self.failed {
            return Poll::Ready(Err(io::Error::other(v.clone())));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        if new.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match this.counter.feed(new, Instant::now()) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(v) => {
                // What came before the frame over the limit goes too: the
                // connection ends with this read.
                buf.set_filled(before);
                this.failed = Some(v.clone());
                Poll::Ready(Err(io::Error::other(v)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: `first` byte (FIN and opcode), then the payload.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&[1, 2, 3, 4]);
        out.extend_from_slice(payload);
        out
    }

    const FIN: u8 = 0x80;

    #[test]
    fn every_frame_counts_pongs_and_pieces_included() {
        let now = Instant::now();
        let mut counter = FrameCounter::new(1.0, 3);
        let mut bytes = frame(FIN | 0xA, b""); // pong
        bytes.extend(frame(0x2, b"ab")); // first piece
        bytes.extend(frame(0x0, b"")); // empty continuation
        assert_eq!(counter.feed(&bytes, now), Ok(()));
        assert!(matches!(
            counter.feed(&frame(0x0, b""), now),
            Err(FrameViolation::Rate { .. })
        ));
    }

    #[test]
    fn headers_split_across_reads_and_long_payloads_are_skipped() {
        let now = Instant::now();
        let mut counter = FrameCounter::new(1.0, 2);
        let mut bytes = frame(FIN | 0x2, &vec![7u8; 70_000]); // 8-byte length
        bytes.extend(frame(FIN | 0x2, &vec![7u8; 300])); // 2-byte length
        // A byte at a time: the payloads' bytes must not read as headers.
        for b in &bytes {
            assert_eq!(counter.feed(std::slice::from_ref(b), now), Ok(()));
        }
        assert!(counter.feed(&frame(FIN | 0x1, b"x"), now).is_err());
    }

    #[test]
    fn a_message_in_pieces_is_bounded_in_pieces_and_time() {
        let now = Instant::now();
        let mut counter = FrameCounter::new(1e9, 1_000_000);
        counter.feed(&frame(0x1, b"a"), now).unwrap();
        for _ in 1..MAX_MESSAGE_FRAMES {
            counter.feed(&frame(0x0, b""), now).unwrap();
        }
        assert_eq!(
            counter.feed(&frame(0x0, b""), now),
            Err(FrameViolation::TooManyPieces)
        );

        let mut counter = FrameCounter::new(1e9, 1_000_000);
        counter.feed(&frame(0x1, b"a"), now).unwrap();
        // Control frames between the pieces are not pieces.
        for _ in 0..MAX_MESSAGE_FRAMES * 2 {
            counter.feed(&frame(FIN | 0x9, b""), now).unwrap();
        }
        counter.feed(&frame(0x0, b"b"), now).unwrap();
        let late = now + MAX_MESSAGE_TIME + Duration::from_millis(1);
        assert_eq!(
            counter.feed(&frame(FIN, b"c"), late),
            Err(FrameViolation::TooSlow)
        );

        // A message whole in time ends the count: the next may take its own.
        let mut counter = FrameCounter::new(1e9, 1_000_000);
        for _ in 0..3 {
            counter.feed(&frame(0x2, b"a"), now).unwrap();
            for _ in 2..MAX_MESSAGE_FRAMES {
                counter.feed(&frame(0x0, b"b"), now).unwrap();
            }
            counter.feed(&frame(FIN, b"c"), now).unwrap();
        }
    }

    #[test]
    fn the_rate_refills_with_time() {
        let now = Instant::now();
        let mut counter = FrameCounter::new(10.0, 1);
        counter.feed(&frame(FIN | 0x2, b"a"), now).unwrap();
        assert!(counter.feed(&frame(FIN | 0x2, b"a"), now).is_err());
        let mut counter = FrameCounter::new(10.0, 1);
        counter.feed(&frame(FIN | 0x2, b"a"), now).unwrap();
        counter
            .feed(&frame(FIN | 0x2, b"a"), now + Duration::from_millis(150))
            .unwrap();
    }
}
