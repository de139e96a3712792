// The SDK in a real browser: headless Chromium (CHROMIUM, default /usr/bin/chromium) driven
// by puppeteer-core loads a test page and the minified bundles from a node http server on
// 127.0.0.1, and talks to a real shardcast node. Prints connect-to-hello times and the rate
// at which one tab receives publications made through the HTTP API.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

import { SECRET, api, epoch, flakyProxy, jwt, publishMany, startNode, until } from "./harness.js";

const here = dirname(fileURLToPath(import.meta.url));

/** The file served at a path: the test page, or a bundle from dist/ (entries and their chunk). */
function served(path) {
  if (path === "/") return ["text/html", join(here, "browser/index.html")];
  if (/^\/shardcast[\w-]*\.min\.js$/.test(path)) {
    return ["text/javascript", join(here, "../dist", path.slice(1))];
  }
  return undefined;
}

let node;
let server;
let origin;
let browser;

before(async () => {
  node = await startNode({ args: ["--secret", SECRET] });
  server = createServer((req, res) => {
    const file = served(req.url);
    if (!file || !existsSync(file[1])) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "content-type": file[0], "cache-control": "no-store" });
    res.end(readFileSync(file[1]));
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  origin = `http://127.0.0.1:${server.address().port}`;
  browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
    headless: true,
    protocolTimeout: 60000,
  });
});

after(async () => {
  await browser?.close();
  server?.close();
  await node?.stop();
});

async function page() {
  const p = await browser.newPage();
  p.on("pageerror", (e) => console.error("page error:", e.message));
  await p.goto(origin + "/");
  await p.waitForFunction(() => window.sdkLoaded === true, { timeout: 10000 });
  return p;
}

test(
  "in Chromium: connect, subscribe, receive a publication made through the HTTP API",
  { timeout: 60000 },
  async () => {
    const p = await page();
    const hello = await p.evaluate(async (ws) => {
      window.client = new Client(`${ws}?user=viewer`);
      window.got = [];
      const sub = window.client.subscribe("live", (m) => window.got.push(m.data));
      const hello = await window.client.connect();
      await sub.ready;
      return hello;
    }, node.ws);
    assert.equal(hello.user, "viewer");
    const res = await api(node, "POST", "/v1/publish", {
      topics: ["live"],
      data: { score: "1-0" },
    });
    assert.equal(res.status, 202);
    await p.waitForFunction(() => window.got.length === 1, { timeout: 10000 });
    assert.deepEqual(await p.evaluate(() => window.got), [{ score: "1-0" }]);
    const refused = await p.evaluate(async () => {
      try {
        await window.client.publish("", 1);
        return null;
      } catch (e) {
        return { error: e instanceof ShardcastError, code: e.code };
      }
    });
    assert.deepEqual(refused, { error: true, code: "bad_request" });
    await p.evaluate(() => window.client.disconnect());
    await p.close();
  },
);

test(
  "in Chromium: a refused token (an HTTP 401 the page cannot read) makes the client ask getToken again",
  { timeout: 60000 },
  async () => {
    const p = await page();
    const tokens = [jwt({ sub: "ivy", exp: epoch(-600) }), jwt({ sub: "ivy", exp: epoch(600) })];
    const result = await p.evaluate(
      async (ws, tokens) => {
        let calls = 0;
        const client = new Client(ws, {
          minReconnectDelay: 50,
          getToken: async () => tokens[calls++],
        });
        const hello = await client.connect();
        client.disconnect();
        return { user: hello.user, calls };
      },
      node.ws,
      tokens,
    );
    assert.deepEqual(result, { user: "ivy", calls: 2 });
    await p.close();
  },
);

test("in Chromium: connect-to-hello time", { timeout: 60000 }, async () => {
  const p = await page();
  const times = await p.evaluate(async (ws) => {
    const times = [];
    for (let i = 0; i < 20; i++) {
      const c = new Client(`${ws}?user=timer${i}`);
      const start = performance.now();
      await c.connect();
      times.push(performance.now() - start);
      c.disconnect();
    }
    return times;
  }, node.ws);
  const sorted = [...times].sort((a, b) => a - b);
  const ms = (x) => x.toFixed(2);
  console.log(
    `chromium connect-to-hello over 20 connections: first ${ms(times[0])} ms, ` +
      `median ${ms(sorted[10])} ms, min ${ms(sorted[0])} ms, max ${ms(sorted[19])} ms`,
  );
  assert.ok(sorted[10] < 1000);
  await p.close();
});

/**
 * Makes the tab count the publications of `topics`, through the SDK (`sdk`) or a bare
 * WebSocket that only parses each frame (the baseline), and waits until it is subscribed.
 */
function listen(p, topics, sdk) {
  return p.evaluate(
    async (ws, topics, sdk) => {
      const f = (window.flood = { n: 0, first: 0, last: 0, seen: new Set() });
      const count = (m) => {
        const now = performance.now();
        if (f.n === 0) f.first = now;
        f.last = now;
        f.n++;
        f.seen.add(`${m.topic}/${m.data.n}`);
      };
      if (sdk) {
        const client = (window.flooded = new Client(`${ws}?user=flood`));
        const subs = topics.map((t) => client.subscribe(t, count));
        await client.connect();
        await Promise.all(subs.map((s) => s.ready));
        return;
      }
      const socket = (window.flooded = new WebSocket(`${ws}?user=flood`));
      let acks = 0;
      const subscribed = new Promise((done) => {
        socket.onmessage = (event) => {
          const m = JSON.parse(event.data);
          if (m.op === "pub") count(m);
          else if (m.op === "ack" && ++acks === topics.length) done();
        };
      });
      await new Promise((done) => (socket.onopen = done));
      topics.forEach((topic, id) => socket.send(JSON.stringify({ op: "sub", topic, id })));
      await subscribed;
    },
    node.ws,
    topics,
    sdk,
  );
}

/** Publishes `count` messages over `fan` topics the tab listens to; prints and returns the rates. */
async function flood(count, fan, sdk) {
  const p = await page();
  const topics = Array.from({ length: fan }, (_, i) => `flood.${count}.${fan}.${i}`);
  await listen(p, topics, sdk);
  const start = Date.now();
  await publishMany(node, topics, count);
  const published = Date.now() - start;
  await p.waitForFunction(
    (count) => window.flood.n >= count,
    { timeout: 60000, polling: 50 },
    count,
  );
  const total = Date.now() - start;
  const f = await p.evaluate(() => ({ ...window.flood, seen: window.flood.seen.size }));
  assert.equal(f.n, count);
  assert.equal(f.seen, count, "every publication once");
  await p.evaluate(() =>
    window.flooded instanceof WebSocket ? window.flooded.close() : window.flooded.disconnect(),
  );
  await p.close();
  const endToEnd = Math.round((count / Math.max(total, 1)) * 1000);
  const tab = Math.round((count / Math.max(f.last - f.first, 1)) * 1000);
  console.log(
    `chromium tab, ${sdk ? "SDK" : "bare WebSocket"}, ${count} publications, ${fan} per POST /v1/publish ` +
      `(16 requests in flight): published in ${published} ms, all received after ${total} ms ` +
      `(${endToEnd}/s end to end; first-to-last ${tab}/s)`,
  );
  return { endToEnd, tab };
}

// One topic: one message per API call, so the publisher sets the pace.
for (const count of [1000, 10000]) {
  test(
    `in Chromium: one tab receives ${count} publications through the SDK (1 per API call)`,
    { timeout: 120000 },
    async () => {
      await flood(count, 1, true);
    },
  );
}

// Fifty topics (the tab subscribes to all): each API call makes fifty messages, so the tab's
// receiving sets the pace. The SDK alternates with a bare WebSocket in the same browser.
test(
  "in Chromium: one tab receives 1000 and 10000 publications (50 per API call), SDK and bare WebSocket",
  { timeout: 180000 },
  async () => {
    await flood(1000, 50, true);
    const rounds = { sdk: [], bare: [] };
    for (let i = 0; i < 3; i++) {
      rounds.sdk.push((await flood(10000, 50, true)).tab);
      rounds.bare.push((await flood(10000, 50, false)).tab);
    }
    const median = (xs) => [...xs].sort((a, b) => a - b)[1];
    console.log(
      `chromium tab, 10000 publications, 50 per call, first-to-last receive rate, median of 3: ` +
        `SDK ${median(rounds.sdk)}/s, bare WebSocket ${median(rounds.bare)}/s`,
    );
  },
);

test(
  "in Chromium: tabs share one connection (SharedClient), and a new leader takes over",
  { timeout: 60000 },
  async () => {
    const open = async () => {
      const p = await page();
      await p.evaluate((ws) => {
        window.got = [];
        window.shared = new SharedClient(() => new Client(`${ws}?user=tabs`), {
          name: "test-tabs",
        });
        window.shared.subscribe("tabs", (m) => window.got.push(m.data));
      }, node.ws);
      return p;
    };
    const first = await open();
    const second = await open();
    const connections = async () => (await api(node, "GET", "/v1/users/tabs")).body.connections;
    const subscribers = async () => (await api(node, "GET", "/v1/topics/tabs")).body.subscribers;
    await until(
      async () => (await connections()) === 1 && (await subscribers()) === 1,
      10000,
      "one connection",
    );
    assert.deepEqual(
      [
        await first.evaluate(() => window.shared.leader),
        await second.evaluate(() => window.shared.leader),
      ],
      [true, false],
    );

    await api(node, "POST", "/v1/publish", { topics: ["tabs"], data: 1 });
    for (const p of [first, second])
      await p.waitForFunction(() => window.got.includes(1), { timeout: 10000 });
    const mid = await second.evaluate(() => window.shared.publish("tabs", 2));
    assert.match(mid, /^\d+$/);
    const refused = await second.evaluate(() =>
      window.shared.send("", 1).then(
        () => null,
        (e) => ({ error: e instanceof ShardcastError, code: e.code }),
      ),
    );
    assert.deepEqual(refused, { error: true, code: "bad_request" }, "a refusal crosses tabs");
    for (const p of [first, second])
      await p.waitForFunction(() => window.got.includes(2), { timeout: 10000 });

    await first.close({ runBeforeUnload: false });
    await second.waitForFunction(() => window.shared.leader, { timeout: 10000 });
    await until(
      async () => (await connections()) === 1 && (await subscribers()) === 1,
      10000,
      "new leader subscribed",
    );
    await api(node, "POST", "/v1/publish", { topics: ["tabs"], data: 3 });
    await second.waitForFunction(() => window.got.includes(3), { timeout: 10000 });
    await second.evaluate(() => window.shared.close());
    await second.close();
  },
);

test(
  "in Chromium: the demo page a --dev node serves: a room chat and a direct message between two tabs",
  { timeout: 60000 },
  async () => {
    const demo = `http://${node.listen}/`;
    // Form fields are set and buttons pressed through the DOM, as a page script would.
    const fill = (p, selector, value) =>
      p.$eval(selector, (el, value) => (el.value = value), value);
    const press = (p, selector) => p.$eval(selector, (button) => button.click());
    const open = async (name) => {
      const p = await browser.newPage();
      p.on("pageerror", (e) => console.error("demo page error:", e.message));
      await p.goto(demo);
      await fill(p, "#name", name);
      await fill(p, "#room", "demo-test");
      await press(p, "#join button");
      await p.waitForFunction(
        () => document.querySelector("#status").dataset.state === "connected",
        {
          timeout: 10000,
        },
      );
      return p;
    };
    const ann = await open("ann");
    const ben = await open("ben");
    const logOf = (p, kind) =>
      p.$$eval(`#log li[data-kind="${kind}"]`, (items) => items.map((li) => li.textContent));
    await until(
      async () => (await ann.$eval("#who", (el) => el.dataset.count)) === "2",
      10000,
      "ann sees ben",
    );

    await fill(ann, "#text", "hello room");
    await press(ann, "#say button");
    await until(
      async () => (await logOf(ben, "room")).some((t) => t.startsWith("ann: hello room")),
      10000,
      "ben reads ann",
    );

    await fill(ben, "#to", "ann");
    await fill(ben, "#dmtext", "just you");
    await press(ben, "#dm button");
    await until(
      async () => (await logOf(ann, "direct")).some((t) => t.startsWith("ben → you: just you")),
      10000,
      "ann gets ben's direct message",
    );
    await ann.close();
    await ben.close();
  },
);

test(
  "in Chromium: a connection cut by the network resumes its mailbox with nothing lost",
  { timeout: 60000 },
  async () => {
    const proxy = await flakyProxy(node.listen);
    const p = await page();
    await p.evaluate(async (url) => {
      window.got = [];
      window.downs = 0;
      window.client = new Client(`${url}?user=hana`, {
        minReconnectDelay: 50,
        maxReconnectDelay: 200,
      });
      window.client.on("message", (m) => window.got.push(m.data.n));
      window.client.on("disconnected", () => window.downs++);
      await window.client.connect();
    }, proxy.url);
    const publish = (from, to) =>
      Promise.all(
        Array.from({ length: to - from + 1 }, (_, i) =>
          api(node, "POST", "/v1/publish", { users: ["hana"], data: { n: from + i } }),
        ),
      );
    await publish(1, 10);
    await p.waitForFunction(() => window.got.length === 10, { timeout: 10000 });
    proxy.cut();
    await p.waitForFunction(() => window.downs === 1, { timeout: 10000 });
    await publish(11, 30);
    proxy.restore();
    await p.waitForFunction(() => window.got.length >= 30, { timeout: 20000 });
    await publish(31, 35);
    await p.waitForFunction(() => window.got.length >= 35, { timeout: 10000 });
    const got = await p.evaluate(() => window.got);
    assert.deepEqual(
      [...got].sort((a, b) => a - b),
      Array.from({ length: 35 }, (_, i) => i + 1),
      "every message exactly once",
    );
    await p.evaluate(() => window.client.disconnect());
    proxy.close();
    await p.close();
  },
);

test("in Chromium: kicked through the API (4003): no reconnect", { timeout: 60000 }, async () => {
  const p = await page();
  await p.evaluate(async (ws) => {
    window.events = [];
    window.client = new Client(`${ws}?user=kim`, { minReconnectDelay: 50 });
    window.client.on("disconnected", (e) => window.events.push(e));
    window.client.on("connected", () => window.events.push("connected"));
    await window.client.connect();
  }, node.ws);
  assert.equal((await api(node, "DELETE", "/v1/users/kim/connections")).status, 202);
  await p.waitForFunction(() => window.events.some((e) => e.code === 4003), { timeout: 10000 });
  await new Promise((r) => setTimeout(r, 1000));
  const events = await p.evaluate(() => window.events);
  assert.deepEqual(events[1], { code: 4003, reason: "kicked", reconnect: false });
  assert.equal(events.filter((e) => e === "connected").length, 1, "never reconnected");
  assert.equal(await p.evaluate(() => window.client.state), "idle");
  await p.close();
});

test(
  "in Chromium: the token is refreshed before exp and the connection outlives it",
  { timeout: 60000 },
  async () => {
    const p = await page();
    const short = jwt({ sub: "rio", exp: epoch(6) });
    const long = jwt({ sub: "rio", exp: epoch(600) });
    await p.evaluate(
      async (ws, short, long) => {
        window.downs = [];
        let calls = 0;
        window.client = new Client(ws, { getToken: async () => (calls++ === 0 ? short : long) });
        window.client.on("disconnected", (e) => window.downs.push(e));
        window.hello = await window.client.connect();
      },
      node.ws,
      short,
      long,
    );
    assert.ok((await p.evaluate(() => window.hello.exp)) > 0, "hello.exp");
    // Past exp and the node's 5 s of leeway: a connection that did not refresh is closed 4402.
    await new Promise((r) => setTimeout(r, 13000));
    assert.deepEqual(await p.evaluate(() => window.downs), []);
    assert.ok((await p.evaluate(() => window.client.ping())) >= 0);
    await p.evaluate(() => window.client.disconnect());
    await p.close();
  },
);
