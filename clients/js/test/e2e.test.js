// End-to-end tests in Node: the SDK (with the `ws` package as its WebSocket) against real
// shardcast nodes on loopback ports.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket, { WebSocketServer } from "ws";

import { Client, ShardcastError } from "../dist/index.js";
import {
  SECRET,
  api,
  epoch,
  flakyProxy,
  jwt,
  next,
  publishMany,
  startNode,
  startRedis,
  until,
} from "./harness.js";

const nodes = [];
const clients = [];

after(async () => {
  for (const c of clients) c.disconnect();
  await Promise.all(nodes.map((n) => n.stop()));
});

async function node(options) {
  const n = await startNode(options);
  nodes.push(n);
  return n;
}

function client(n, user, options = {}) {
  const c = new Client(`${n.ws}?user=${user}`, {
    WebSocket,
    minReconnectDelay: 50,
    maxReconnectDelay: 500,
    ...options,
  });
  clients.push(c);
  return c;
}

test("connect: hello names the user, the node and the heartbeat", { timeout: 20000 }, async () => {
  const n = await node();
  const c = client(n, "alice");
  const hello = await c.connect();
  assert.equal(hello.op, "hello");
  assert.equal(hello.user, "alice");
  assert.equal(typeof hello.node, "string");
  assert.equal(typeof hello.conn, "string");
  assert.ok(hello.hb > 0);
  assert.equal(c.state, "connected");
  assert.ok((await c.ping()) >= 0);
  c.disconnect();
});

test("sub/pub round trip between two clients; send between users", { timeout: 20000 }, async () => {
  const n = await node();
  const alice = client(n, "alice");
  const bob = client(n, "bob");
  await Promise.all([alice.connect(), bob.connect()]);

  const got = [];
  const sub = alice.subscribe("room.1", (m) => got.push(m));
  await sub.ready;
  const mid = await bob.publish("room.1", { text: "hi", n: [1, 2] });
  assert.match(mid, /^\d+$/);
  await until(() => got.length === 1, 5000, "publication");
  assert.equal(got[0].topic, "room.1");
  assert.equal(got[0].mid, mid);
  assert.deepEqual(got[0].data, { text: "hi", n: [1, 2] });

  const direct = next(alice, "message");
  const sent = await bob.send("alice", "psst");
  const m = await direct;
  assert.equal(m.from, "bob");
  assert.equal(m.to, "alice");
  assert.equal(m.mid, sent);
  assert.equal(m.data, "psst");

  const fromApi = next(alice, "message");
  assert.equal((await api(n, "POST", "/v1/publish", { users: ["alice"], data: 7 })).status, 202);
  assert.equal((await fromApi).from, undefined);

  const everyone = next(bob, "broadcast");
  await api(n, "POST", "/v1/publish", { broadcast: true, data: "all" });
  assert.equal((await everyone).data, "all");

  sub.unsubscribe();
  await until(
    async () => (await api(n, "GET", "/v1/topics/room.1")).body.subscribers === 0,
    5000,
    "unsub",
  );
  alice.disconnect();
  bob.disconnect();
});

test("errors from the server reject with their code", { timeout: 20000 }, async () => {
  const n = await node();
  const c = client(n, "carol");
  await c.connect();
  const bad = c.subscribe("", () => {});
  await assert.rejects(bad.ready, (e) => e instanceof ShardcastError && e.code === "bad_request");
  await assert.rejects(c.send("", 1), { code: "bad_request" });
  // `up` on a node without an upstream sink: refused `unavailable`, and the refusal
  // reaches the caller.
  await assert.rejects(c.up({ x: 1 }), { code: "unavailable" });
  c.disconnect();
});

test("kicked through the API (4003): no reconnect", { timeout: 20000 }, async () => {
  const n = await node();
  const c = client(n, "dave");
  await c.connect();
  const gone = next(c, "disconnected");
  const kick = await api(n, "DELETE", "/v1/users/dave/connections");
  assert.equal(kick.status, 202);
  const info = await gone;
  assert.equal(info.code, 4003);
  assert.equal(info.reconnect, false);
  await new Promise((r) => setTimeout(r, 1000));
  assert.equal(c.state, "idle");
  assert.equal((await api(n, "GET", "/v1/users/dave")).body.online, false);
});

test(
  "node killed and restarted on the same port: the client reconnects and resubscribes",
  { timeout: 30000 },
  async () => {
    const first = await node();
    const c = client(first, "erin");
    await c.connect();
    const got = [];
    await c.subscribe("news", (m) => got.push(m.data)).ready;
    const reconnecting = [];
    c.on("reconnecting", (r) => reconnecting.push(r));

    const lost = next(c, "disconnected");
    await first.stop("SIGKILL");
    assert.deepEqual(await lost, { code: 1006, reason: "", reconnect: true });

    const back = next(c, "connected", 20000);
    const second = await node({ listen: first.listen });
    const hello = await back;
    assert.equal(hello.user, "erin");
    assert.ok(reconnecting.length >= 1);
    await until(
      async () => (await api(second, "GET", "/v1/topics/news")).body.subscribers === 1,
      5000,
      "resubscribed",
    );
    await api(second, "POST", "/v1/publish", { topics: ["news"], data: "after restart" });
    await until(() => got.includes("after restart"), 5000, "publication after restart");
    c.disconnect();
  },
);

test(
  "node draining (SIGTERM, 1001): the client reconnects promptly to a node on the same address",
  { timeout: 30000 },
  async () => {
    const first = await node();
    const c = client(first, "frank", { drainReconnectDelay: 200 });
    await c.connect();
    const lost = next(c, "disconnected");
    await first.stop("SIGTERM");
    const info = await lost;
    assert.equal(info.code, 1001);
    assert.equal(info.reconnect, true);
    const back = next(c, "connected", 20000);
    await node({ listen: first.listen });
    assert.equal((await back).user, "frank");
    c.disconnect();
  },
);

test(
  "a refused token (HTTP 401 at the handshake): getToken is asked again, the next attempt connects",
  { timeout: 20000 },
  async () => {
    const n = await node({ args: ["--secret", SECRET] });
    const issued = [];
    const c = new Client(n.ws, {
      WebSocket,
      minReconnectDelay: 50,
      getToken: () => {
        issued.push(jwt({ sub: "gina", exp: epoch(issued.length === 0 ? -600 : 600) }));
        return issued[issued.length - 1];
      },
    });
    clients.push(c);
    const hello = await c.connect();
    assert.equal(hello.user, "gina");
    assert.equal(issued.length, 2, "the expired token, then a fresh one");
    c.disconnect();
  },
);

test(
  "a token's pub claim: publishing elsewhere is refused with forbidden",
  { timeout: 20000 },
  async () => {
    const n = await node({ args: ["--secret", SECRET] });
    const c = new Client(n.ws, {
      WebSocket,
      token: jwt({ sub: "hank", pub: ["chat.*"], exp: epoch(600) }),
    });
    clients.push(c);
    await c.connect();
    assert.match(await c.publish("chat.1", "ok"), /^\d+$/);
    await assert.rejects(
      c.publish("news", "no"),
      (e) => e instanceof ShardcastError && e.code === "forbidden",
    );
    c.disconnect();
  },
);

test(
  "replaced (4001, over max_devices_per_user): the oldest device does not reconnect",
  { timeout: 20000 },
  async () => {
    const dir = mkdtempSync(join(tmpdir(), "shardcast-js-"));
    try {
      const config = join(dir, "one-device.toml");
      writeFileSync(config, "max_devices_per_user = 1\n");
      const n = await node({ args: ["--config", config] });
      const older = client(n, "ken");
      await older.connect();
      const gone = next(older, "disconnected");
      const newer = client(n, "ken");
      await newer.connect();
      const info = await gone;
      assert.equal(info.code, 4001);
      assert.equal(info.reconnect, false);
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(older.state, "idle");
      assert.equal(newer.state, "connected");
      assert.equal((await api(n, "GET", "/v1/users/ken")).body.connections, 1);
      newer.disconnect();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

test("send: the sender's other devices get a copy", { timeout: 20000 }, async () => {
  const n = await node();
  const phone = client(n, "lena");
  const laptop = client(n, "lena");
  const mo = client(n, "mo");
  await Promise.all([phone.connect(), laptop.connect(), mo.connect()]);
  const copy = next(laptop, "message");
  const delivered = next(mo, "message");
  const mid = await phone.send("mo", { hi: 1 });
  for (const m of [await copy, await delivered]) {
    assert.deepEqual([m.from, m.to, m.mid, m.data], ["lena", "mo", mid, { hi: 1 }]);
  }
  for (const c of [phone, laptop, mo]) c.disconnect();
});

test(
  "liveness on real sockets: a server gone silent is pinged, then replaced",
  { timeout: 20000 },
  async () => {
    // A stand-in server: says hello with a 1 s heartbeat, then never answers anything.
    const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((done) => server.once("listening", done));
    const heard = [];
    let connections = 0;
    server.on("connection", (socket) => {
      connections++;
      socket.on("message", (data) => heard.push(JSON.parse(String(data)).op));
      socket.send(JSON.stringify({ op: "hello", user: "u", conn: "1", node: "silent", hb: 1 }));
    });
    try {
      const c = new Client(`ws://127.0.0.1:${server.address().port}/ws`, {
        WebSocket,
        livenessMargin: 500,
        minReconnectDelay: 50,
      });
      clients.push(c);
      await c.connect();
      const started = Date.now();
      const gone = await next(c, "disconnected", 10000);
      const after = Date.now() - started;
      assert.deepEqual(gone, { code: 1006, reason: "liveness timeout", reconnect: true });
      assert.ok(after >= 1400 && after < 8000, `replaced after ${after} ms`);
      assert.deepEqual(heard, ["ping"]);
      await next(c, "connected", 5000);
      assert.equal(connections, 2);
      c.disconnect();
    } finally {
      server.close();
    }
  },
);

test(
  "one Node client receives 10000 publications (50 per API call), each once",
  { timeout: 30000 },
  async () => {
    const n = await node();
    const c = client(n, "nora");
    const topics = Array.from({ length: 50 }, (_, i) => `flood.${i}`);
    const seen = new Set();
    let first = 0;
    let last = 0;
    const count = (m) => {
      last = performance.now();
      if (seen.size === 0) first = last;
      seen.add(`${m.topic}/${m.data.n}`);
    };
    const subs = topics.map((t) => c.subscribe(t, count));
    await c.connect();
    await Promise.all(subs.map((s) => s.ready));
    const start = performance.now();
    await publishMany(n, topics, 10000);
    await until(() => seen.size >= 10000, 20000, "10000 publications");
    const total = performance.now() - start;
    assert.equal(seen.size, 10000);
    console.log(
      `node (ws) client, SDK, 10000 publications, 50 per POST /v1/publish: all received after ` +
        `${Math.round(total)} ms (${Math.round(10000000 / total)}/s end to end; first-to-last ` +
        `${Math.round(10000000 / Math.max(last - first, 1))}/s)`,
    );
    c.disconnect();
  },
);

test(
  "a connection cut by the network: the client resumes its mailbox and loses nothing",
  { timeout: 30000 },
  async () => {
    const n = await node();
    const proxy = await flakyProxy(n.listen);
    const c = new Client(`${proxy.url}?user=gina`, {
      WebSocket,
      minReconnectDelay: 50,
      maxReconnectDelay: 200,
    });
    clients.push(c);
    const got = [];
    c.on("message", (m) => got.push(m.data.n));
    await c.connect();
    const publish = (from, to) =>
      Promise.all(
        Array.from({ length: to - from + 1 }, (_, i) =>
          api(n, "POST", "/v1/publish", { users: ["gina"], data: { n: from + i } }),
        ),
      );
    await publish(1, 10);
    await until(() => got.length === 10, 5000, "the first ten, live");

    const lost = next(c, "disconnected");
    proxy.cut();
    await lost;
    // Published while the device is away: they wait in the mailbox.
    await publish(11, 30);
    const back = next(c, "connected", 10000);
    proxy.restore();
    await back;
    await until(() => got.length >= 30, 10000, "everything, after the resume");
    await publish(31, 35);
    await until(() => got.length >= 35, 5000, "and live again");
    assert.deepEqual(
      [...got].sort((a, b) => a - b),
      Array.from({ length: 35 }, (_, i) => i + 1),
      "every message exactly once",
    );
    c.disconnect();
    proxy.close();
  },
);

test(
  "a node killed under a clustered client: it reconnects to another node and resumes its mailbox from Redis, nothing lost",
  { timeout: 60000 },
  async () => {
    const redis = await startRedis();
    try {
      const cluster = ["--redis", redis.url];
      const a = await node({ args: [...cluster, "--node-id", "js-a"] });
      const b = await node({ args: [...cluster, "--node-id", "js-b"] });
      const proxy = await flakyProxy(a.listen);
      const c = new Client(`${proxy.url}?user=kai`, {
        WebSocket,
        minReconnectDelay: 50,
        maxReconnectDelay: 300,
      });
      clients.push(c);
      const got = [];
      c.on("message", (m) => got.push(m.data.n));
      const first = await c.connect();
      assert.equal(first.node, "js-a");
      const publish = (n, from, to) =>
        Promise.all(
          Array.from({ length: to - from + 1 }, (_, i) =>
            api(n, "POST", "/v1/publish", { users: ["kai"], data: { n: from + i } }),
          ),
        );
      await publish(b, 1, 10);
      await until(() => got.length === 10, 10000, "the first ten, live through Redis");

      const lost = next(c, "disconnected");
      await a.stop("SIGKILL");
      proxy.cut();
      await lost;
      // Published while the device has no node: they wait in its mailbox in Redis.
      await publish(b, 11, 30);
      const back = next(c, "connected", 20000);
      proxy.restore(b.listen);
      assert.equal((await back).node, "js-b");
      await until(() => got.length >= 30, 15000, "everything, after the resume");
      await publish(b, 31, 35);
      await until(() => got.length >= 35, 10000, "and live again");
      assert.deepEqual(
        [...got].sort((x, y) => x - y),
        Array.from({ length: 35 }, (_, i) => i + 1),
        "every message exactly once",
      );
      c.disconnect();
      proxy.close();
    } finally {
      redis.stop();
    }
  },
);
