//! The binary envelopes nodes exchange through Redis pub/sub. Pure data, no I/O.
//!
//! Every envelope starts with a version byte and a kind byte, then the sending bridge's
//! instance id (so a node skips what it published itself when it comes back on a topic or
//! the broadcast channel). Message envelopes end with the complete, already-rendered
//! WebSocket frame: the receiving node slices it out of the payload (one `Bytes`, no copy)
//! and writes it to its sockets without parsing or re-serializing the JSON inside.
//!
//! ```text
//! version u8 = 1 | kind u8 | origin u64 | body
//!   user:          mid u64 | users u8 | (name_len u16 | name)… | frame…
//!   direct:        mid u64 | ts u64 | from_len u16 | from | users u32 | (name_len u16 | name)… | data…
//!   topic:         mid u64 | name_len u16 | name | frame…
//!   broadcast:     mid u64 | frame…
//!   kick:          code u16 | name_len u16 | user
//!   evict:         conn u64
//!   probe:         nonce u64
//!   topic_query:   request u64 | name_len u16 | topic
//!   topic_count:   request u64 | count u64 | name_len u16 | node id
//!   mailboxes:     mid u64 | ts u64 | except u64 | from_len u16 | from | to_len u16 | to
//!                  | users u32 | (name_len u16 | name)… | data… | positions
//!   history:       mid u64 | ts u64 | name_len u16 | topic | data… | positions
//! ```
//! `mailboxes` and `history` are streamed messages (protocol v1.1, clustered): the bridge
//! writes only their head (everything before `data`), and the Redis script that appends the
//! message to its streams publishes `head .. data .. positions`, the trailer holding each
//! stream's `(seq, ep)` ([`crate::cluster::redis_layout::split_positions`]): one position
//! per user of `mailboxes`, in order, one for `history`. The receiving node renders each
//! frame with its position. Their origin gets them back too (that is how its own devices
//! get the numbered frame, in Redis's order): `except` is the sending connection, which
//! does not get its own message, meaningful only to the origin (0: none; connection ids
//! start at 1). An empty `to` is a message whose frames name each recipient.
//! `direct` is the one envelope without a rendered frame: a message for many users at once,
//! whose frames differ by recipient (`to`), carries `data` once and the receiving node
//! renders each recipient's frame as it writes it (see [`crate::router::Body::PerUser`]).
//! An empty `from` is a message from the server.
//!
//! Integers are little-endian. A node that receives another version counts the envelope in
//! `shardcast_bus_envelopes_invalid_total`, logs it and drops it: nodes of two versions can
//! share a Redis during a rolling upgrade without misreading each other. A node of the
//! previous build counts a `direct` envelope the same way, as an unknown kind.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::cluster::redis_layout::split_positions;
use crate::history::Position;

/// The envelope format this build writes and reads.
pub const VERSION: u8 = 1;

/// What a decoded envelope asks the receiving node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Deliver `frame` to every local device of each of `users` (a direct message's
    /// recipient, and its sender for the copies to the sender's other devices).
    User {
        /// Message id (for logs).
        mid: u64,
        /// The users.
        users: Vec<String>,
        /// The rendered WebSocket frame.
        frame: Bytes,
    },
    /// Deliver a direct message to every local device of each of `users`, rendering each
    /// user's frame from `data`.
    Direct {
        /// Message id.
        mid: u64,
        /// Server time of the message, ms.
        ts: u64,
        /// The sending user (`None` from the server).
        from: Option<String>,
        /// The recipients.
        users: Vec<String>,
        /// The message's `data` (JSON text).
        data: String,
    },
    /// Deliver `frame` to every local subscriber of `topic`.
    Topic {
        /// Message id.
        mid: u64,
        /// Topic.
        topic: String,
        /// The rendered WebSocket frame.
        frame: Bytes,
    },
    /// Deliver `frame` to every local user connection.
    Broadcast {
        /// Message id.
        mid: u64,
        /// The rendered WebSocket frame.
        frame: Bytes,
    },
    /// Close every local connection of `user` with `code`.
    Kick {
        /// User.
        user: String,
        /// WebSocket close code.
        code: u16,
    },
    /// Close one local connection with 4001: the user is over the cluster's device limit.
    Evict {
        /// The connection (an id of the receiving node).
        conn: u64,
    },
    /// The bridge's own liveness probe of its subscription.
    Probe {
        /// Which probe.
        nonce: u64,
    },
    /// Answer with this node's subscriber count of `topic` (to the origin's node channel).
    TopicQuery {
        /// The asker's request id.
        request: u64,
        /// Topic.
        topic: String,
    },
    /// A direct message appended to the mailboxes of `users` (in Redis): deliver it to every
    /// local device of each, rendered with that user's `positions` entry.
    Mailboxes {
        /// Message id.
        mid: u64,
        /// Server time of the message, ms.
        ts: u64,
        /// The sending connection, skipped on the origin node.
        except: Option<u64>,
        /// The sending user (`None` from the server).
        from: Option<String>,
        /// The recipient every frame names (a client's `send`); `None`: each user's frame
        /// names that user.
        to: Option<String>,
        /// The users: the recipients, then a sender whose other devices get a copy.
        users: Vec<String>,
        /// The message's `data` (JSON text).
        data: String,
        /// Each user's mailbox position of the message, in the order of `users`.
        positions: Vec<Position>,
    },
    /// A publication appended to `topic`'s history (in Redis): deliver it to every local
    /// subscriber, rendered with `position`.
    History {
        /// Message id.
        mid: u64,
        /// Server time of the message, ms.
        ts: u64,
        /// Topic.
        topic: String,
        /// The message's `data` (JSON text).
        data: String,
        /// Its position in the topic's history.
        position: Position,
    },
    /// One node's answer to a [`Body::TopicQuery`].
    TopicCount {
        /// The request answered.
        request: u64,
        /// Local subscribers.
        count: u64,
        /// The answering node's id.
        node: String,
    },
}

/// A decoded envelope: who sent it and what it asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The sending bridge's instance id.
    pub origin: u64,
    /// What to do.
    pub body: Body,
}

/// Why an envelope could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Written by a build speaking another envelope version.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// A kind this version does not know.
    #[error("unknown envelope kind {0}")]
    Kind(u8),
    /// Shorter than its fields say, or a name that is not UTF-8.
    #[error("truncated or malformed envelope")]
    Malformed,
}

mod kind {
    pub const USER: u8 = 1;
    pub const TOPIC: u8 = 2;
    pub const BROADCAST: u8 = 3;
    pub const KICK: u8 = 4;
    pub const EVICT: u8 = 5;
    pub const PROBE: u8 = 6;
    pub const TOPIC_QUERY: u8 = 7;
    pub const TOPIC_COUNT: u8 = 8;
    pub const DIRECT: u8 = 9;
    pub const MAILBOXES: u8 = 10;
    pub const HISTORY: u8 = 11;
}

const HEADER: usize = 2 + 8;

fn header(kind: u8, origin: u64, body: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(HEADER + body);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u64_le(origin);
    out
}

fn put_name(out: &mut BytesMut, name: &str) {
    // Names are checked against max_name_bytes (well under 64 KiB) before they get here.
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    out.put_u16_le(len);
    out.put_slice(&name.as_bytes()[..len as usize]);
}

/// A message for the devices of `users` on other nodes (at most 255 users).
pub fn user<S: AsRef<str>>(origin: u64, mid: u64, users: &[S], frame: &[u8]) -> Bytes {
    let users = &users[..users.len().min(u8::MAX as usize)];
    let names: usize = users.iter().map(|u| 2 + u.as_ref().len()).sum();
    let mut out = header(kind::USER, origin, 8 + 1 + names + frame.len());
    out.put_u64_le(mid);
    out.put_u8(users.len() as u8);
    for user in users {
        put_name(&mut out, user.as_ref());
    }
    out.put_slice(frame);
    out.freeze()
}

/// A direct message for the devices of many `users` on other nodes, rendered there per
/// recipient.
pub fn direct<S: AsRef<str>>(
    origin: u64,
    mid: u64,
    ts: u64,
    from: Option<&str>,
    users: &[S],
    data: &str,
) -> Bytes {
    let from = from.unwrap_or("");
    let names: usize = users.iter().map(|u| 2 + u.as_ref().len()).sum();
    let mut out = header(
        kind::DIRECT,
        origin,
        8 + 8 + 2 + from.len() + 4 + names + data.len(),
    );
    out.put_u64_le(mid);
    out.put_u64_le(ts);
    put_name(&mut out, from);
    out.put_u32_le(u32::try_from(users.len()).unwrap_or(u32::MAX));
    for user in users.iter().take(u32::MAX as usize) {
        put_name(&mut out, user.as_ref());
    }
    out.put_slice(data.as_bytes());
    out.freeze()
}

/// The head of a [`Body::Mailboxes`] envelope: the Redis script publishes it followed by
/// `data` and the positions.
#[allow(clippy::too_many_arguments)]
pub fn mailboxes_head<S: AsRef<str>>(
    origin: u64,
    mid: u64,
    ts: u64,
    except: Option<u64>,
    from: Option<&str>,
    to: Option<&str>,
    users: &[S],
) -> Bytes {
    let (from, to) = (from.unwrap_or(""), to.unwrap_or(""));
    let names: usize = users.iter().map(|u| 2 + u.as_ref().len()).sum();
    let mut out = header(
        kind::MAILBOXES,
        origin,
        24 + 2 + from.len() + 2 + to.len() + 4 + names,
    );
    out.put_u64_le(mid);
    out.put_u64_le(ts);
    out.put_u64_le(except.unwrap_or(0));
    put_name(&mut out, from);
    put_name(&mut out, to);
    out.put_u32_le(u32::try_from(users.len()).unwrap_or(u32::MAX));
    for user in users.iter().take(u32::MAX as usize) {
        put_name(&mut out, user.as_ref());
    }
    out.freeze()
}

/// The head of a [`Body::History`] envelope: the Redis script publishes it followed by
/// `data` and the position.
pub fn history_head(origin: u64, mid: u64, ts: u64, topic: &str) -> Bytes {
    let mut out = header(kind::HISTORY, origin, 16 + 2 + topic.len());
    out.put_u64_le(mid);
    out.put_u64_le(ts);
    put_name(&mut out, topic);
    out.freeze()
}

/// A publication for a topic's subscribers on other nodes.
pub fn topic(origin: u64, mid: u64, topic: &str, frame: &[u8]) -> Bytes {
    let mut out = header(kind::TOPIC, origin, 8 + 2 + topic.len() + frame.len());
    out.put_u64_le(mid);
    put_name(&mut out, topic);
    out.put_slice(frame);
    out.freeze()
}

/// A broadcast for every other node.
pub fn broadcast(origin: u64, mid: u64, frame: &[u8]) -> Bytes {
    let mut out = header(kind::BROADCAST, origin, 8 + frame.len());
    out.put_u64_le(mid);
    out.put_slice(frame);
    out.freeze()
}

/// Close a user's connections on other nodes.
pub fn kick(origin: u64, user: &str, code: u16) -> Bytes {
    let mut out = header(kind::KICK, origin, 4 + user.len());
    out.put_u16_le(code);
    put_name(&mut out, user);
    out.freeze()
}

/// Close one connection of another node (device limit).
pub fn evict(origin: u64, conn: u64) -> Bytes {
    let mut out = header(kind::EVICT, origin, 8);
    out.put_u64_le(conn);
    out.freeze()
}

/// The subscription liveness probe.
pub fn probe(origin: u64, nonce: u64) -> Bytes {
    let mut out = header(kind::PROBE, origin, 8);
    out.put_u64_le(nonce);
    out.freeze()
}

/// Ask every node subscribed to `topic` for its subscriber count.
pub fn topic_query(origin: u64, request: u64, topic: &str) -> Bytes {
    let mut out = header(kind::TOPIC_QUERY, origin, 10 + topic.len());
    out.put_u64_le(request);
    put_name(&mut out, topic);
    out.freeze()
}

/// Answer a topic query.
pub fn topic_count(origin: u64, request: u64, count: u64, node: &str) -> Bytes {
    let mut out = header(kind::TOPIC_COUNT, origin, 18 + node.len());
    out.put_u64_le(request);
    out.put_u64_le(count);
    put_name(&mut out, node);
    out.freeze()
}

/// Reads an envelope. Frames are slices of `payload` (no copy).
pub fn decode(payload: Bytes) -> Result<Decoded, DecodeError> {
    let mut rest = payload.clone();
    if rest.remaining() < HEADER {
        return Err(DecodeError::Malformed);
    }
    let version = rest.get_u8();
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = rest.get_u8();
    let origin = rest.get_u64_le();
    let body = match kind {
        kind::USER => {
            let mid = u64_of(&mut rest)?;
            if rest.remaining() < 1 {
                return Err(DecodeError::Malformed);
            }
            let count = rest.get_u8();
            let users = (0..count)
                .map(|_| name_of(&mut rest))
                .collect::<Result<_, _>>()?;
            Body::User {
                mid,
                users,
                frame: rest,
            }
        }
        kind::DIRECT => {
            let mid = u64_of(&mut rest)?;
            let ts = u64_of(&mut rest)?;
            let from = optional_name_of(&mut rest)?;
            let users = names_of(&mut rest)?;
            let data = text_of(rest)?;
            Body::Direct {
                mid,
                ts,
                from,
                users,
                data,
            }
        }
        kind::MAILBOXES => {
            let (mut rest, positions) = split_positions(&rest).ok_or(DecodeError::Malformed)?;
            let mid = u64_of(&mut rest)?;
            let ts = u64_of(&mut rest)?;
            let except = Some(u64_of(&mut rest)?).filter(|&conn| conn != 0);
            let from = optional_name_of(&mut rest)?;
            let to = optional_name_of(&mut rest)?;
            let users = names_of(&mut rest)?;
            if users.len() != positions.len() {
                return Err(DecodeError::Malformed);
            }
            Body::Mailboxes {
                mid,
                ts,
                except,
                from,
                to,
                users,
                data: text_of(rest)?,
                positions,
            }
        }
        kind::HISTORY => {
            let (mut rest, positions) = split_positions(&rest).ok_or(DecodeError::Malformed)?;
            let mid = u64_of(&mut rest)?;
            let ts = u64_of(&mut rest)?;
            let topic = name_of(&mut rest)?;
            let Ok([position]) = <[Position; 1]>::try_from(positions) else {
                return Err(DecodeError::Malformed);
            };
            Body::History {
                mid,
                ts,
                topic,
                data: text_of(rest)?,
                position,
            }
        }
        kind::TOPIC => Body::Topic {
            mid: u64_of(&mut rest)?,
            topic: name_of(&mut rest)?,
            frame: rest,
        },
        kind::BROADCAST => Body::Broadcast {
            mid: u64_of(&mut rest)?,
            frame: rest,
        },
        kind::KICK => {
            if rest.remaining() < 2 {
                return Err(DecodeError::Malformed);
            }
            let code = rest.get_u16_le();
            Body::Kick {
                user: name_of(&mut rest)?,
                code,
            }
        }
        kind::EVICT => Body::Evict {
            conn: u64_of(&mut rest)?,
        },
        kind::PROBE => Body::Probe {
            nonce: u64_of(&mut rest)?,
        },
        kind::TOPIC_QUERY => Body::TopicQuery {
            request: u64_of(&mut rest)?,
            topic: name_of(&mut rest)?,
        },
        kind::TOPIC_COUNT => Body::TopicCount {
            request: u64_of(&mut rest)?,
            count: u64_of(&mut rest)?,
            node: name_of(&mut rest)?,
        },
        other => return Err(DecodeError::Kind(other)),
    };
    Ok(Decoded { origin, body })
}

fn u64_of(rest: &mut Bytes) -> Result<u64, DecodeError> {
    if rest.remaining() < 8 {
        return Err(DecodeError::Malformed);
    }
    Ok(rest.get_u64_le())
}

/// A `u32` count of names, then the names.
fn names_of(rest: &mut Bytes) -> Result<Vec<String>, DecodeError> {
    if rest.remaining() < 4 {
        return Err(DecodeError::Malformed);
    }
    let count = rest.get_u32_le() as usize;
    // Every name takes at least its two length bytes: a count the payload cannot hold is
    // refused before anything is allocated for it.
    if count > rest.remaining() / 2 {
        return Err(DecodeError::Malformed);
    }
    (0..count).map(|_| name_of(rest)).collect()
}

fn text_of(rest: Bytes) -> Result<String, DecodeError> {
    String::from_utf8(rest.to_vec()).map_err(|_| DecodeError::Malformed)
}

/// A name that may be absent, written empty (a sender, a recipient).
fn optional_name_of(rest: &mut Bytes) -> Result<Option<String>, DecodeError> {
    Ok(Some(name_of(rest)?).filter(|name| !name.is_empty()))
}

fn name_of(rest: &mut Bytes) -> Result<String, DecodeError> {
    if rest.remaining() < 2 {
        return Err(DecodeError::Malformed);
    }
    let len = rest.get_u16_le() as usize;
    if rest.remaining() < len {
        return Err(DecodeError::Malformed);
    }
    let name = rest.split_to(len);
    String::from_utf8(name.to_vec()).map_err(|_| DecodeError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::redis_layout::positions_trailer;

    #[test]
    fn every_kind_round_trips() {
        let frame = b"\x81\x05hello";
        let cases = [
            (
                user(7, 42, &["bob", "alice"], frame),
                Body::User {
                    mid: 42,
                    users: vec!["bob".into(), "alice".into()],
                    frame: Bytes::from_static(frame),
                },
            ),
            (
                direct(7, 45, 1000, Some("carol"), &["bob", "alice"], r#"{"x":1}"#),
                Body::Direct {
                    mid: 45,
                    ts: 1000,
                    from: Some("carol".into()),
                    users: vec!["bob".into(), "alice".into()],
                    data: r#"{"x":1}"#.into(),
                },
            ),
            (
                direct::<&str>(7, 46, 1000, None, &[], "1"),
                Body::Direct {
                    mid: 46,
                    ts: 1000,
                    from: None,
                    users: vec![],
                    data: "1".into(),
                },
            ),
            (
                topic(7, 43, "room", frame),
                Body::Topic {
                    mid: 43,
                    topic: "room".into(),
                    frame: Bytes::from_static(frame),
                },
            ),
            (
                broadcast(7, 44, frame),
                Body::Broadcast {
                    mid: 44,
                    frame: Bytes::from_static(frame),
                },
            ),
            (
                kick(7, "bob", 4003),
                Body::Kick {
                    user: "bob".into(),
                    code: 4003,
                },
            ),
            (
                streamed(
                    mailboxes_head(
                        7,
                        47,
                        1000,
                        Some(3),
                        Some("carol"),
                        Some("bob"),
                        &["bob", "carol"],
                    ),
                    r#"{"x":1}"#,
                    &[at(4, "ep1"), at(9, "ep2")],
                ),
                Body::Mailboxes {
                    mid: 47,
                    ts: 1000,
                    except: Some(3),
                    from: Some("carol".into()),
                    to: Some("bob".into()),
                    users: vec!["bob".into(), "carol".into()],
                    data: r#"{"x":1}"#.into(),
                    positions: vec![at(4, "ep1"), at(9, "ep2")],
                },
            ),
            (
                streamed(
                    mailboxes_head::<&str>(7, 48, 1000, None, None, None, &["bob"]),
                    "2",
                    &[at(1, "e")],
                ),
                Body::Mailboxes {
                    mid: 48,
                    ts: 1000,
                    except: None,
                    from: None,
                    to: None,
                    users: vec!["bob".into()],
                    data: "2".into(),
                    positions: vec![at(1, "e")],
                },
            ),
            (
                streamed(history_head(7, 49, 1000, "room"), "[]", &[at(5, "ep")]),
                Body::History {
                    mid: 49,
                    ts: 1000,
                    topic: "room".into(),
                    data: "[]".into(),
                    position: at(5, "ep"),
                },
            ),
            (evict(7, 99), Body::Evict { conn: 99 }),
            (probe(7, 5), Body::Probe { nonce: 5 }),
            (
                topic_query(7, 8, "room"),
                Body::TopicQuery {
                    request: 8,
                    topic: "room".into(),
                },
            ),
            (
                topic_count(7, 8, 12, "node-a"),
                Body::TopicCount {
                    request: 8,
                    count: 12,
                    node: "node-a".into(),
                },
            ),
        ];
        for (encoded, body) in cases {
            assert_eq!(decode(encoded), Ok(Decoded { origin: 7, body }));
        }
    }

    fn at(seq: u64, ep: &str) -> Position {
        Position { seq, ep: ep.into() }
    }

    /// What the Redis scripts publish: the head, `data`, then the positions.
    fn streamed(head: Bytes, data: &str, positions: &[Position]) -> Bytes {
        let mut out = head.to_vec();
        out.extend_from_slice(data.as_bytes());
        out.extend_from_slice(&positions_trailer(positions));
        out.into()
    }

    #[test]
    fn streamed_envelopes_need_one_position_per_stream() {
        let head = || mailboxes_head(1, 2, 3, None, None, None, &["a", "b"]);
        assert_eq!(
            decode(streamed(head(), "1", &[at(1, "e")])),
            Err(DecodeError::Malformed)
        );
        assert_eq!(decode(head()), Err(DecodeError::Malformed), "no trailer");
        let topic = || history_head(1, 2, 3, "t");
        assert_eq!(
            decode(streamed(topic(), "1", &[])),
            Err(DecodeError::Malformed)
        );
        let good = streamed(topic(), "1", &[at(1, "e")]);
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn frames_are_slices_of_the_payload() {
        let payload = user(1, 2, &["u"], b"frame");
        let base = payload.as_ptr() as usize;
        let Ok(Decoded {
            body: Body::User { frame, .. },
            ..
        }) = decode(payload.clone())
        else {
            panic!("decodes");
        };
        assert_eq!(frame.as_ptr() as usize, base + payload.len() - 5);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut other_version = user(1, 2, &["u"], b"f").to_vec();
        other_version[0] = 2;
        assert_eq!(decode(other_version.into()), Err(DecodeError::Version(2)));
        assert_eq!(
            decode(Bytes::from_static(&[1, 99, 0, 0, 0, 0, 0, 0, 0, 0])),
            Err(DecodeError::Kind(99))
        );
        let good = topic_count(1, 2, 3, "node");
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut huge_count = direct::<&str>(1, 2, 3, None, &[], "").to_vec();
        huge_count[HEADER + 18..HEADER + 22].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(huge_count.into()), Err(DecodeError::Malformed));
        let mut seed = 0x1234_5678_u64;
        for _ in 0..2000 {
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            let _ = decode(bytes.into());
        }
    }
}
