//! Micro-benchmarks of the per-message hot paths, each beside a naive baseline:
//! rendering a publication frame once for fan-out, parsing a client request, decoding inbound
//! frames, unmasking, and making message ids.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
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

criterion_group!(benches, rendering, parsing, decoding, mids);
criterion_main!(benches);
