//! Messages larger than the server's `max_payload`: cut into pieces that each fit,
//! published one after the other, and put back together by the receiver.
//!
//! A message that fits is published as it is, with no header. A larger one becomes
//! `count` pieces of at most `max_payload - HEADER_ROOM` bytes, each with the header
//! `Vllm-Part: {id}/{index}/{count}`; only the last piece carries the reply subject. A
//! NATS server delivers one connection's messages to a subscriber in the order they
//! were published, so the receiver appends piece `index` to message `id` and hands
//! the message on when the last one arrives. A piece out of order (a publisher that
//! died mid-message, a server restart between two pieces), a message over the
//! receiver's limit, or a message not finished within its time to live is dropped.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

/// The header of a piece.
pub(crate) const PART: &str = "Vllm-Part";

/// Room left in each piece for its header (the `NATS/1.0` line, the header's name and
/// value, the line ends).
pub(crate) const HEADER_ROOM: usize = 256;

/// `payload` as the messages to publish in order: `(None, payload)` when it fits in
/// `max_payload`, else pieces with their headers. `id` names the message among every
/// message of this publisher.
pub(crate) fn split(
    payload: Bytes,
    max_payload: usize,
    id: &str,
) -> Vec<(Option<HeaderMap>, Bytes)> {
    if payload.len() <= max_payload {
        return vec![(None, payload)];
    }
    let room = max_payload.saturating_sub(HEADER_ROOM).max(1);
    let count = payload.len().div_ceil(room);
    (0..count)
        .map(|index| {
            let start = index * room;
            let end = (start + room).min(payload.len());
            let mut headers = HeaderMap::new();
            headers.insert(PART, format!("{id}/{index}/{count}").as_str());
            (Some(headers), payload.slice(start..end))
        })
        .collect()
}

/// What one received message made.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A whole message: it came whole, or this was its last piece.
    Whole(Bytes),
    /// A piece of a message still incomplete.
    Partial,
    /// Dropped, and why (a piece out of order, or a message too large).
    Dropped(String),
}

struct Partial {
    parts: Vec<Bytes>,
    count: usize,
    size: usize,
    started: Instant,
}

/// Puts pieces back together, for one subscription.
pub(crate) struct Reassembler {
    partial: HashMap<String, Partial>,
    /// The largest message.
    limit: usize,
    /// How long a message may take to arrive whole.
    ttl: Duration,
}

impl Reassembler {
    /// Messages up to `limit` bytes, each whole within `ttl`.
    pub(crate) fn new(limit: usize, ttl: Duration) -> Self {
        Reassembler {
            partial: HashMap::new(),
            limit,
            ttl,
        }
    }

    /// How many messages are incomplete.
    #[cfg(test)]
    fn incomplete(&self) -> usize {
        self.partial.len()
    }

    /// Takes one received message.
    pub(crate) fn accept(&mut self, headers: Option<&HeaderMap>, payload: Bytes) -> Piece {
        let Some(part) = headers.and_then(|h| h.get(PART)) else {
            return Piece::Whole(payload);
        };
        let now = Instant::now();
        let ttl = self.ttl;
        self.partial
            .retain(|_, p| now.duration_since(p.started) < ttl);
        let Some((id, index, count)) = parse(part.as_str()) else {
            return Piece::Dropped(format!("a malformed {PART} header: {}", part.as_str()));
        };
        if index == 0 {
            self.partial.insert(
                id.to_owned(),
                Partial {
                    parts: Vec::with_capacity(count.min(1024)),
                    count,
                    size: 0,
                    started: now,
                },
            );
        }
        let Some(p) = self.partial.get_mut(id) else {
            return Piece::Dropped(format!("piece {index} of {id} without its first"));
        };
        if p.parts.len() != index || p.count != count {
            self.partial.remove(id);
            return Piece::Dropped(format!("piece {index} of {id} out of order"));
        }
        p.size += payload.len();
        if p.size > self.limit {
            self.partial.remove(id);
            return Piece::Dropped(format!(
                "message {id} is over the {} bytes a message may have",
                self.limit
            ));
        }
        p.parts.push(payload);
        if p.parts.len() < p.count {
            return Piece::Partial;
        }
        let Some(p) = self.partial.remove(id) else {
            return Piece::Partial;
        };
        let mut whole = BytesMut::with_capacity(p.size);
        for part in p.parts {
            whole.extend_from_slice(&part);
        }
        Piece::Whole(whole.freeze())
    }
}

fn parse(value: &str) -> Option<(&str, usize, usize)> {
    let mut fields = value.rsplitn(3, '/');
    let count: usize = fields.next()?.parse().ok()?;
    let index: usize = fields.next()?.parse().ok()?;
    let id = fields.next()?;
    (index < count && !id.is_empty()).then_some((id, index, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> Bytes {
        (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
    }

    #[test]
    fn a_message_that_fits_is_sent_whole() {
        let parts = split(body(1000), 1000, "m1");
        assert_eq!(parts.len(), 1);
        assert!(parts[0].0.is_none(), "no header");
    }

    #[tokio::test]
    async fn a_large_message_is_cut_and_put_back() {
        let payload = body(10_000);
        let parts = split(payload.clone(), 1024, "m1");
        assert_eq!(parts.len(), 10_000usize.div_ceil(1024 - HEADER_ROOM));
        assert!(parts.iter().all(|(_, p)| p.len() <= 1024 - HEADER_ROOM));
        let mut r = Reassembler::new(1 << 20, Duration::from_secs(5));
        let last = parts.len() - 1;
        for (i, (h, p)) in parts.into_iter().enumerate() {
            let got = r.accept(h.as_ref(), p);
            if i < last {
                assert_eq!(got, Piece::Partial);
            } else {
                assert_eq!(got, Piece::Whole(payload.clone()));
            }
        }
        assert_eq!(r.incomplete(), 0);
    }

    #[tokio::test]
    async fn interleaved_messages_are_kept_apart() {
        let (x, y) = (body(3000), body(2000));
        let xs = split(x.clone(), 1000, "x");
        let ys = split(y.clone(), 1000, "y");
        let mut r = Reassembler::new(1 << 20, Duration::from_secs(5));
        let mut whole = Vec::new();
        let mut xs = xs.into_iter();
        let mut ys = ys.into_iter();
        loop {
            let (a, b) = (xs.next(), ys.next());
            if a.is_none() && b.is_none() {
                break;
            }
            for (h, p) in a.into_iter().chain(b) {
                if let Piece::Whole(w) = r.accept(h.as_ref(), p) {
                    whole.push(w);
                }
            }
        }
        assert_eq!(whole, vec![y, x], "y has fewer pieces: whole first");
    }

    #[tokio::test]
    async fn a_missing_piece_or_a_message_too_large_is_dropped() {
        let parts = split(body(5000), 1000, "m");
        let mut r = Reassembler::new(1 << 20, Duration::from_secs(5));
        let (h0, p0) = parts[0].clone();
        assert_eq!(r.accept(h0.as_ref(), p0), Piece::Partial);
        let (h2, p2) = parts[2].clone();
        assert!(matches!(r.accept(h2.as_ref(), p2), Piece::Dropped(_)));
        assert_eq!(r.incomplete(), 0, "the broken message is forgotten");
        let mut small = Reassembler::new(2000, Duration::from_secs(5));
        let mut outcome = Piece::Partial;
        for (h, p) in parts {
            outcome = small.accept(h.as_ref(), p);
            if outcome != Piece::Partial {
                break;
            }
        }
        assert!(matches!(outcome, Piece::Dropped(m) if m.contains("over")));
        assert_eq!(small.incomplete(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unfinished_message_expires() {
        let parts = split(body(5000), 1000, "m");
        let mut r = Reassembler::new(1 << 20, Duration::from_secs(5));
        let (h0, p0) = parts[0].clone();
        r.accept(h0.as_ref(), p0);
        tokio::time::advance(Duration::from_secs(6)).await;
        let other = split(body(5000), 1000, "n");
        let (h, p) = other[0].clone();
        r.accept(h.as_ref(), p);
        assert_eq!(r.incomplete(), 1, "only the new message is kept");
    }
}
