//! Micro-benchmarks of the per-message hot paths, each beside a naive baseline where one
//! makes sense: rendering a publication frame once for fan-out, parsing a client request,
//! decoding inbound frames, unmasking, making message ids, handing an envelope to another
//! shard, looking up which shards hold a user, and a cross-node envelope round trip.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use shardcast::cluster::wire;
use shardcast::protocol::{self, render, MidGenerator};
use shardcast::ws::{self, Flow, Inbound, Limits};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

const DATA: &str = r#"{"user":"alice","text":"hello, room","emotes":[1,2,3],"meta":{"seq":42}}"#;

fn rendering(c: &mut Criterion) {
    let mut group = c.benchmark_group("render_publication");
    group.bench_function("shardcast", |b| {
        b.iter(|| render::publication(Some(black_box("room.1")), 1, 2, black_box(DATA)))
    });
    group.bench_function("naive_serde_value", |b| {
        let data: Value = serde_json::from_str(DATA).expect("json");
        b.iter(|| {
            let value =
                json!({"op":"pub","topic":black_box("room.1"),"mid":"1","ts":2,"data":data});
            ws::frame(
                OpCode::Data(Data::Text),
                &serde_json::to_vec(&value).expect("json"),
            )
        })
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let request = format!(r#"{{"op":"pub","id":7,"topic":"room.1","data":{DATA}}}"#);
    let mut group = c.benchmark_group("parse_request");
    group.bench_function("shardcast_borrowed", |b| {
        b.iter(|| protocol::parse_request(black_box(&request)).is_ok())
    });
    group.bench_function("naive_owned_value", |b| {
        b.iter(|| serde_json::from_str::<Value>(black_box(&request)).is_ok())
    });
    group.finish();
}

fn masked_frames(count: usize, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    for _ in 0..count {
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Text),
            mask: Some([1, 2, 3, 4]),
            ..FrameHeader::default()
        };
        header
            .format(payload.len() as u64, &mut wire)
            .expect("header");
        let mut body = payload.to_vec();
        ws::unmask(&mut body, [1, 2, 3, 4]);
        wire.extend(body);
    }
    wire
}

fn decoding(c: &mut Criterion) {
    let wire = masked_frames(100, DATA.as_bytes());
    let limits = Limits {
        max_frame: 65536,
        max_message: 65536,
    };
    c.bench_function("decode_100_frames", |b| {
        b.iter_batched_ref(
            || wire.clone(),
            |input| {
                let mut seen = 0;
                Inbound::default()
                    .feed(input, limits, |_| {
                        seen += 1;
                        Flow::Continue
                    })
                    .expect("valid");
                seen
            },
            criterion::BatchSize::SmallInput,
        )
    });

    let mut group = c.benchmark_group("unmask_4k");
    let mut buf = vec![7u8; 4096];
    group.bench_function("shardcast_word_at_a_time", |b| {
        b.iter(|| ws::unmask(black_box(&mut buf), [1, 2, 3, 4]))
    });
    group.bench_function("naive_bytewise", |b| {
        b.iter(|| {
            for (i, byte) in black_box(&mut buf).iter_mut().enumerate() {
                *byte ^= [1u8, 2, 3, 4][i & 3];
            }
        })
    });
    group.finish();
}

fn mids(c: &mut Criterion) {
    let mut generator = MidGenerator::new(1, 1);
    c.bench_function("mid_next", |b| {
        b.iter(|| generator.next(black_box(MidGenerator::timestamp_ms(0) + 1_000)))
    });
}

fn handoff(c: &mut Criterion) {
    use shardcast::metrics::ShardMetrics;
    use shardcast::router::{Envelope, Mesh};
    let mut group = c.benchmark_group("handoff_envelope");
    use shardcast::router::Message;
    let frame = bytes::Bytes::from_static(b"frame");
    let envelope = || Envelope::Broadcast {
        message: Message::new(1, frame.clone()),
    };
    let (mesh, inboxes) = Mesh::new(2, 1024);
    let metrics = ShardMetrics::default();
    let waker = futures_lite::future::block_on(futures_lite::future::poll_fn(|cx| {
        std::task::Poll::Ready(cx.waker().clone())
    }));
    let mut cx = std::task::Context::from_waker(&waker);
    group.bench_function("shardcast_mesh", |b| {
        b.iter(|| {
            mesh.to_shard(1, envelope(), &metrics);
            inboxes[1].poll_recv(&mut cx)
        })
    });
    let (tx, rx) = std::sync::mpsc::sync_channel::<Envelope>(1024);
    group.bench_function("std_sync_channel", |b| {
        b.iter(|| {
            tx.send(envelope()).expect("send");
            rx.recv().expect("recv")
        })
    });
    group.finish();
}

// The baseline is the naive shared map a multi-threaded gateway would lock.
#[allow(clippy::disallowed_types)]
fn user_lookup(c: &mut Criterion) {
    use shardcast::router::{conn_id, Directory};
    use std::collections::HashMap;
    use std::sync::Arc;
    let mut directory = Directory::default();
    let mut naive: HashMap<String, Vec<u64>> = HashMap::new();
    for i in 0..10_000u64 {
        let user = format!("user{i}");
        directory.device_online(Arc::from(user.as_str()), conn_id((i % 8) as usize, i), 8);
        naive
            .entry(user)
            .or_default()
            .push(conn_id((i % 8) as usize, i));
    }
    let naive = std::sync::Mutex::new(naive);
    let mut group = c.benchmark_group("user_shards_lookup");
    group.bench_function("shardcast_home_directory", |b| {
        b.iter(|| directory.user_shards(black_box("user4242")))
    });
    group.bench_function("naive_mutex_hashmap", |b| {
        b.iter(|| {
            naive
                .lock()
                .expect("lock")
                .get(black_box("user4242"))
                .cloned()
        })
    });
    group.finish();
}

/// A cross-node envelope: binary with the rendered frame inside (what nodes exchange),
/// against the JSON-in-JSON envelope many gateways use (the receiving node parses the
/// envelope and re-renders the client frame).
fn envelopes(c: &mut Criterion) {
    let frame = render::publication(Some("room.1"), 1, 2, DATA);
    let mut group = c.benchmark_group("cross_node_envelope");
    group.bench_function("shardcast_binary_encode_decode", |b| {
        b.iter(|| {
            let payload = wire::topic(7, 1, black_box("room.1"), black_box(&frame));
            wire::decode(payload).is_ok()
        })
    });
    group.bench_function("naive_json_in_json", |b| {
        let data: Value = serde_json::from_str(DATA).expect("json");
        b.iter(|| {
            let envelope = serde_json::to_vec(
                &json!({"v":1,"origin":"7","topic":black_box("room.1"),"mid":"1","ts":2,"data":data}),
            )
            .expect("json");
            let parsed: Value = serde_json::from_slice(&envelope).expect("json");
            let client = json!({"op":"pub","topic":parsed["topic"],"mid":parsed["mid"],"ts":parsed["ts"],"data":parsed["data"]});
            ws::frame(
                OpCode::Data(Data::Text),
                &serde_json::to_vec(&client).expect("json"),
            )
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    rendering,
    parsing,
    decoding,
    mids,
    handoff,
    user_lookup,
    envelopes
);
criterion_main!(benches);
