// Unit tests of the client's state machine: a fake socket plays the server, a fake clock
// drives every timer (requests, backoff, liveness, token refresh).
import { test, beforeEach } from "node:test";
import assert from "node:assert/strict";

import { Client, ShardcastError } from "../dist/index.js";
import { FakeClock, FakeSocket, flush } from "./fakes.js";

let clock;

beforeEach(() => {
  FakeSocket.all = [];
  clock = new FakeClock();
});

/** A client on the fake socket and clock; `random` fixed unless given. */
function client(options = {}) {
  return new Client("ws://gw.test/ws", {
    WebSocket: FakeSocket,
    clock,
    random: () => 0.5,
    ...options,
  });
}

/** A connected client and its socket. */
async function connected(options = {}, hello = {}) {
  const c = client(options);
  const ready = c.connect();
  await flush();
  const ws = FakeSocket.last();
  ws.open(hello);
  await ready;
  return { c, ws };
}

function events(c, name) {
  const seen = [];
  c.on(name, (payload) => seen.push(payload));
  return seen;
}

test("acks are matched to their requests by id, in any order", async () => {
  const { c, ws } = await connected();
  const a = c.publish("t", { n: 1 });
  const b = c.send("bob", "hi");
  const [pub, send] = ws.sent;
  assert.deepEqual(pub, { op: "pub", topic: "t", data: { n: 1 }, id: pub.id });
  assert.deepEqual(send, { op: "send", to: "bob", data: "hi", id: send.id });
  assert.notEqual(pub.id, send.id);
  ws.frame({ op: "ack", id: send.id, mid: "22" });
  ws.frame({ op: "ack", id: pub.id, mid: "11" });
  assert.equal(await a, "11");
  assert.equal(await b, "22");
});

test("an err frame rejects its request with a ShardcastError carrying the code", async () => {
  const { c, ws } = await connected();
  const p = c.publish("secret", 1);
  ws.frame({ op: "err", id: ws.sent[0].id, code: "forbidden", msg: "not allowed" });
  await assert.rejects(p, (e) => e instanceof ShardcastError && e.code === "forbidden");
});

test("ping resolves on its pong; up sends data and stream", async () => {
  const { c, ws } = await connected();
  const rtt = c.ping();
  await clock.advance(7);
  ws.answer("ping", (f) => ({ op: "pong", id: f.id }));
  assert.equal(await rtt, 7);
  const up = c.up({ x: 1 }, { stream: "orders" });
  assert.deepEqual(ws.ops("up")[0], {
    op: "up",
    data: { x: 1 },
    stream: "orders",
    id: ws.ops("up")[0].id,
  });
  ws.answer("up", (f) => ({ op: "ack", id: f.id, mid: "9" }));
  assert.equal(await up, "9");
});

test("a request times out with code timeout; the per-request timeout wins", async () => {
  const { c } = await connected({ requestTimeout: 1000 });
  const slow = c.publish("t", 1);
  const slowFailed = assert.rejects(slow, { code: "timeout" });
  const fast = c.publish("t", 2, { timeout: 100 });
  let fastDone = false;
  fast.catch(() => (fastDone = true));
  await clock.advance(100);
  assert.ok(fastDone);
  await assert.rejects(fast, { code: "timeout" });
  await clock.advance(900);
  await slowFailed;
});

test("requests made while connecting are sent after hello; in-flight ones fail on a lost connection", async () => {
  const c = client();
  c.connect();
  await flush();
  const queued = c.publish("t", "early");
  const ws = FakeSocket.last();
  assert.equal(ws.sent.length, 0);
  ws.open();
  assert.equal(ws.ops("pub").length, 1);
  const inFlight = c.publish("t", "late");
  ws.serverClose(1006);
  await assert.rejects(queued, { code: "disconnected" });
  await assert.rejects(inFlight, { code: "disconnected" });
});

test("backoff: full jitter under an exponential cap, bounded by maxReconnectDelay", async () => {
  for (const r of [0, 0.5, 0.999]) {
    FakeSocket.all = [];
    const c = client({ random: () => r, minReconnectDelay: 100, maxReconnectDelay: 1000 });
    const delays = events(c, "reconnecting");
    c.connect().catch(() => {});
    await flush();
    for (let i = 0; i < 8; i++) {
      FakeSocket.last().serverClose(1006);
      await clock.advance(delays[delays.length - 1].delay);
    }
    const caps = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
    assert.deepEqual(
      delays.map((d) => d.delay),
      caps.map((cap) => r * cap),
    );
    assert.deepEqual(
      delays.map((d) => d.attempt),
      [1, 2, 3, 4, 5, 6, 7, 8],
    );
    assert.equal(FakeSocket.all.length, 9);
    c.disconnect();
  }
});

test("a connection stable for a while resets the backoff", async () => {
  const { c, ws } = await connected({ minReconnectDelay: 100 });
  const delays = events(c, "reconnecting");
  ws.serverClose(1006);
  await clock.advance(50);
  FakeSocket.last().serverClose(1006);
  await clock.advance(100);
  FakeSocket.last().open();
  await clock.advance(10_000);
  FakeSocket.last().serverClose(1006);
  assert.deepEqual(
    delays.map((d) => d.delay),
    [50, 100, 50],
  );
  c.disconnect();
});

for (const code of [4001, 4003]) {
  test(`no reconnect after close ${code}`, async () => {
    const { c, ws } = await connected();
    const gone = events(c, "disconnected");
    ws.serverClose(code, code === 4001 ? "replaced" : "kicked");
    await clock.advance(120_000);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(c.state, "idle");
    assert.deepEqual(gone, [
      { code, reason: code === 4001 ? "replaced" : "kicked", reconnect: false },
    ]);
  });
}

test("after 1001 the client reconnects promptly, within drainReconnectDelay", async () => {
  const { c, ws } = await connected({ drainReconnectDelay: 400, random: () => 0.25 });
  const gone = events(c, "disconnected");
  ws.serverClose(1001, "draining");
  assert.deepEqual(gone, [{ code: 1001, reason: "draining", reconnect: true }]);
  await clock.advance(99);
  assert.equal(FakeSocket.all.length, 1);
  await clock.advance(1);
  assert.equal(FakeSocket.all.length, 2);
  c.disconnect();
});

test("after a reconnect every topic is subscribed again and streams resume from the last seq", async () => {
  const { c, ws } = await connected({}, { mailbox: { seq: 4, ep: "m1" } });
  const room = [];
  c.subscribe("room", (m) => room.push(m.seq));
  c.subscribe("plain", () => {});
  ws.answer("sub", (f) => ({ op: "ack", id: f.id }));
  ws.frame({ op: "msg", to: "u", mid: "1", ts: 1, data: 0, seq: 5, ep: "m1" });
  ws.frame({ op: "pub", topic: "room", mid: "2", ts: 1, data: 0, seq: 3, ep: "r1" });
  assert.deepEqual(c.mailboxPosition, { seq: 5, ep: "m1" });
  ws.serverClose(1006);
  await clock.advance(1000);
  const again = FakeSocket.last();
  assert.notEqual(again, ws);
  again.open({ mailbox: { seq: 9, ep: "m1" } });
  const sent = again.sent.map(({ id, ...f }) => f);
  assert.deepEqual(sent, [
    { op: "resume", since: { seq: 5, ep: "m1" } },
    { op: "sub", topic: "room", since: { seq: 3, ep: "r1" } },
    { op: "sub", topic: "plain" },
  ]);
  c.disconnect();
});

test("a server without seq/ep (v1) gets plain subs and no resume", async () => {
  const { c, ws } = await connected();
  c.subscribe("room", () => {});
  ws.frame({ op: "msg", to: "u", mid: "1", ts: 1, data: 0 });
  ws.frame({ op: "pub", topic: "room", mid: "2", ts: 1, data: 0 });
  ws.serverClose(1006);
  await clock.advance(1000);
  FakeSocket.last().open();
  assert.deepEqual(
    FakeSocket.last().sent.map(({ id, ...f }) => f),
    [{ op: "sub", topic: "room" }],
  );
  assert.equal(c.mailboxPosition, undefined);
  c.disconnect();
});

test("duplicates are dropped by seq, also across a reconnect's replay", async () => {
  const { c, ws } = await connected();
  const got = [];
  c.on("message", (m) => got.push(m.seq));
  const dm = (seq, ep = "e") => ({ op: "msg", to: "u", mid: String(seq), ts: 1, data: 0, seq, ep });
  for (const s of [1, 2, 2, 3, 1]) ws.frame(dm(s));
  assert.deepEqual(got, [1, 2, 3]);
  ws.serverClose(1006);
  await clock.advance(1000);
  const again = FakeSocket.last();
  again.open();
  assert.deepEqual(again.ops("resume")[0].since, { seq: 3, ep: "e" });
  // A live message overtakes the replay; the replay still fills the gap, then repeats nothing.
  for (const s of [6, 4, 5, 6, 3]) again.frame(dm(s));
  again.answer("resume", (f) => ({ op: "ack", id: f.id, recovered: true, seq: 6, ep: "e" }));
  again.frame(dm(7));
  assert.deepEqual(got, [1, 2, 3, 6, 4, 5, 7]);
  // A new epoch starts afresh.
  again.frame(dm(1, "e2"));
  assert.deepEqual(got, [1, 2, 3, 6, 4, 5, 7, 1]);
  c.disconnect();
});

test("recovered:false acks are surfaced as an event, and the position follows the server", async () => {
  const { c, ws } = await connected({ mailbox: { seq: 10, ep: "old" } });
  const lost = events(c, "recovered-false");
  ws.answer("resume", (f) => ({ op: "ack", id: f.id, recovered: false, seq: 3, ep: "new" }));
  const sub = c.subscribe("room", () => {}, { since: { seq: 0, ep: "" } });
  assert.deepEqual(ws.ops("sub")[0].since, { seq: 0, ep: "" });
  ws.answer("sub", (f) => ({ op: "ack", id: f.id, recovered: false, seq: 8, ep: "r" }));
  assert.deepEqual((await sub.ready).recovered, false);
  assert.deepEqual(lost, [
    { seq: 3, ep: "new" },
    { topic: "room", seq: 8, ep: "r" },
  ]);
  assert.deepEqual(c.mailboxPosition, { seq: 3, ep: "new" });
  c.disconnect();
});

test("a refused subscription rejects ready, reports an error and is forgotten", async () => {
  const { c, ws } = await connected();
  const errors = events(c, "error");
  const sub = c.subscribe("bad topic", () => {});
  ws.answer("sub", (f) => ({ op: "err", id: f.id, code: "bad_request", msg: "bad name" }));
  await assert.rejects(sub.ready, { code: "bad_request", topic: "bad topic" });
  assert.equal(errors.length, 1);
  ws.serverClose(1006);
  await clock.advance(1000);
  FakeSocket.last().open();
  assert.equal(FakeSocket.last().ops("sub").length, 0);
  c.disconnect();
});

test("handlers share one server subscription; the last unsubscribe sends unsub", async () => {
  const { c, ws } = await connected();
  const a = [];
  const b = [];
  const sa = c.subscribe("room", (m) => a.push(m.data));
  const sb = c.subscribe("room", (m) => b.push(m.data));
  assert.equal(ws.ops("sub").length, 1);
  ws.frame({ op: "pub", topic: "room", mid: "1", ts: 1, data: 1 });
  sa.unsubscribe();
  ws.frame({ op: "pub", topic: "room", mid: "2", ts: 1, data: 2 });
  assert.equal(ws.ops("unsub").length, 0);
  sb.unsubscribe();
  assert.deepEqual(
    ws.ops("unsub").map(({ id, ...f }) => f),
    [{ op: "unsub", topic: "room" }],
  );
  ws.frame({ op: "pub", topic: "room", mid: "3", ts: 1, data: 3 });
  assert.deepEqual(a, [1]);
  assert.deepEqual(b, [1, 2]);
  const early = c.subscribe("brief", () => {});
  early.unsubscribe();
  await assert.rejects(early.ready, { code: "unsubscribed", topic: "brief" });
  c.disconnect();
});

test("broadcasts and direct messages are events", async () => {
  const { c, ws } = await connected();
  const b = events(c, "broadcast");
  const m = events(c, "message");
  ws.frame({ op: "pub", mid: "1", ts: 1, data: "all" });
  ws.frame({ op: "msg", from: "bob", to: "u", mid: "2", ts: 1, data: "hi" });
  assert.equal(b[0].data, "all");
  assert.equal(m[0].from, "bob");
  c.disconnect();
});

test("liveness: an idle connection is pinged after hb, replaced after hb plus the margin", async () => {
  const { c, ws } = await connected({ livenessMargin: 5000 }, { hb: 10 });
  const gone = events(c, "disconnected");
  await clock.advance(9_999);
  assert.equal(ws.ops("ping").length, 0);
  await clock.advance(1);
  assert.equal(ws.ops("ping").length, 1);
  ws.frame({ op: "pong" });
  await clock.advance(14_999);
  assert.equal(ws.closedWith, undefined, "the pong kept it alive");
  assert.equal(ws.ops("ping").length, 2);
  await clock.advance(5_001);
  assert.deepEqual(ws.closedWith, { code: 4000, reason: "liveness timeout" });
  assert.deepEqual(gone, [{ code: 1006, reason: "liveness timeout", reconnect: true }]);
  await clock.advance(1000);
  assert.equal(FakeSocket.all.length, 2);
  c.disconnect();
});

test("a connection attempt that never says hello times out", async () => {
  const c = client({ connectTimeout: 3000 });
  c.connect().catch(() => {});
  await flush();
  await clock.advance(3000);
  assert.ok(FakeSocket.all[0].closedWith);
  assert.equal(c.state, "waiting");
  c.disconnect();
});

test("getToken is asked for a fresh token after 4401 and after a failed handshake", async () => {
  let n = 0;
  const getToken = async () => `t${++n}`;
  const { c, ws } = await connected({ getToken });
  assert.equal(ws.url.searchParams.get("token"), "t1");
  ws.serverClose(4401, "unauthorized");
  await clock.advance(1000);
  const second = FakeSocket.last();
  assert.equal(second.url.searchParams.get("token"), "t2");
  second.serverClose(1006);
  await clock.advance(1000);
  assert.equal(FakeSocket.last().url.searchParams.get("token"), "t3");
  FakeSocket.last().open();
  assert.equal(c.state, "connected");
  c.disconnect();
});

test("4401 with a fixed token and no getToken stops with an unauthorized error", async () => {
  const { c, ws } = await connected({ token: "fixed" });
  assert.equal(ws.url.searchParams.get("token"), "fixed");
  const errors = events(c, "error");
  ws.serverClose(4401, "unauthorized");
  await clock.advance(60_000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(errors[0].code, "unauthorized");
});

test("the token is refreshed with a refresh frame shortly before hello.exp, then before the new token's exp", async () => {
  const jwt = (exp) =>
    `h.${Buffer.from(JSON.stringify({ sub: "u", exp })).toString("base64url")}.s`;
  const inSeconds = (s) => Math.floor(clock.now() / 1000) + s;
  const tokens = [];
  const getToken = () => {
    tokens.push(jwt(inSeconds(tokens.length === 0 ? 600 : 300)));
    return tokens[tokens.length - 1];
  };
  const { c, ws } = await connected(
    { getToken, refreshBefore: 30_000 },
    { exp: inSeconds(600), hb: 0 },
  );
  await clock.advance(569_999);
  assert.equal(ws.ops("refresh").length, 0);
  await clock.advance(1);
  assert.deepEqual(
    ws.ops("refresh").map(({ id, ...f }) => f),
    [{ op: "refresh", token: tokens[1] }],
  );
  ws.answer("refresh", (f) => ({ op: "ack", id: f.id }));
  await clock.advance(269_999);
  assert.equal(ws.ops("refresh").length, 1);
  await clock.advance(1);
  assert.equal(ws.ops("refresh")[1].token, tokens[2]);
  ws.serverClose(1006);
  await clock.advance(1000);
  assert.equal(FakeSocket.last().url.searchParams.get("token"), tokens[2]);
  c.disconnect();
});

test("a server without hello.exp gets no refresh, whatever the token says", async () => {
  const jwt = `h.${Buffer.from(JSON.stringify({ exp: Math.floor(clock.now() / 1000) + 60 })).toString("base64url")}.s`;
  const { c, ws } = await connected({ getToken: () => jwt }, { hb: 0 });
  await clock.advance(120_000);
  assert.equal(ws.ops("refresh").length, 0);
  c.disconnect();
});

test("shardcast.v1 is offered by default, and none with protocol: null", async () => {
  const { c, ws } = await connected();
  assert.equal(ws.protocols, "shardcast.v1");
  c.disconnect();
  const other = await connected({ protocol: null });
  assert.equal(other.ws.protocols, undefined);
  other.c.disconnect();
});

test("disconnect() closes with 1000, fails pending requests and stops reconnecting", async () => {
  const { c, ws } = await connected();
  const p = c.publish("t", 1);
  const gone = events(c, "disconnected");
  c.disconnect();
  assert.deepEqual(ws.closedWith, { code: 1000, reason: "client disconnect" });
  await assert.rejects(p, { code: "disconnected" });
  await assert.rejects(c.publish("t", 2), { code: "disconnected" });
  await clock.advance(120_000);
  assert.equal(FakeSocket.all.length, 1);
  assert.deepEqual(gone, [{ code: 1000, reason: "client disconnect", reconnect: false }]);
});

test("browser hooks: online wakes a waiting client at once, offline drops the connection", async () => {
  const target = new EventTarget();
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const { c, ws } = await connected({ minReconnectDelay: 60_000 });
    target.dispatchEvent(new Event("offline"));
    assert.ok(ws.closedWith);
    assert.equal(c.state, "waiting");
    target.dispatchEvent(new Event("online"));
    await flush();
    assert.equal(FakeSocket.all.length, 2);
    c.disconnect();
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("browser hooks: a page turning visible reconnects a waiting client and checks a live one", async () => {
  const target = new EventTarget();
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  globalThis.document = { visibilityState: "hidden" };
  try {
    const { c, ws } = await connected(
      { minReconnectDelay: 60_000, livenessMargin: 5000 },
      { hb: 10 },
    );
    // Timers of a hidden tab run late: the check that is due has not run when it turns visible.
    clock.time += 16_000;
    globalThis.document.visibilityState = "visible";
    target.dispatchEvent(new Event("visibilitychange"));
    assert.deepEqual(ws.closedWith, { code: 4000, reason: "liveness timeout" });
    assert.equal(c.state, "waiting");
    target.dispatchEvent(new Event("visibilitychange"));
    await flush();
    assert.equal(FakeSocket.all.length, 2);
    c.disconnect();
  } finally {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    delete globalThis.document;
  }
});
