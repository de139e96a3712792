// Real shardcast nodes for the end-to-end and browser tests: started from the binary named by
// SHARDCAST_BIN (default ../../target/release/shardcast, else ../../target/debug/shardcast),
// on loopback ports the kernel picks, in --dev mode (?user=NAME trusted, API without a key).
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import http from "node:http";
import net from "node:net";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** The shardcast binary to test against. */
export function shardcastBin() {
  if (process.env.SHARDCAST_BIN) return resolve(process.env.SHARDCAST_BIN);
  for (const profile of ["release", "debug"]) {
    const bin = resolve(here, "../../../target", profile, "shardcast");
    if (existsSync(bin)) return bin;
  }
  throw new Error("no shardcast binary: build one (cargo build --release) or set SHARDCAST_BIN");
}

/**
 * The environment for a node: this one without any `SHARDCAST_*` variable, since a node reads
 * every one as a setting and refuses unknown keys (such as `SHARDCAST_BIN`).
 */
function nodeEnv() {
  return Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith("SHARDCAST_")),
  );
}

/**
 * Starts a dev node; resolves once it logged its start line, with its WebSocket URL
 * (`ws`), API base URL (`api`), the client listener address (`listen`) and `stop(signal)`.
 */
export function startNode({ listen = "127.0.0.1:0", args = [], startTimeout = 15000 } = {}) {
  const proc = spawn(
    shardcastBin(),
    [
      "serve",
      "--dev",
      "--listen",
      listen,
      "--api-listen",
      "127.0.0.1:0",
      "--shards",
      "1",
      "--log-format",
      "json",
      ...args,
    ],
    {
      env: { ...nodeEnv(), SHARDCAST_PIN_SHARDS: "false", RUST_LOG: "info" },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  const exited = new Promise((done) => proc.once("exit", (code, signal) => done({ code, signal })));
  return new Promise((resolveStart, reject) => {
    let log = "";
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(new Error(`shardcast did not start within ${startTimeout} ms:\n${log}`));
    }, startTimeout);
    const onData = (chunk) => {
      log += chunk;
      for (const line of log.split("\n").slice(0, -1)) {
        if (!line.includes("shardcast node started")) continue;
        const fields = JSON.parse(line).fields ?? JSON.parse(line);
        clearTimeout(timer);
        proc.stdout.off("data", onData);
        proc.stderr.off("data", onData);
        proc.stdout.resume();
        proc.stderr.resume();
        resolveStart({
          proc,
          listen: fields.listen,
          ws: `ws://${fields.listen}/ws`,
          api: `http://${fields.api_listen}`,
          exited,
          /** Stops the node (SIGKILL unless told) and resolves once it exited. */
          stop(signal = "SIGKILL") {
            if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
            return exited;
          },
        });
        return;
      }
    };
    proc.stdout.setEncoding("utf8").on("data", onData);
    proc.stderr.setEncoding("utf8").on("data", onData);
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`shardcast exited (${code}) before it started:\n${log}`));
    });
  });
}

/** Calls the node's HTTP API; resolves with `{status, body}` (body parsed when JSON). */
export async function api(node, method, path, body) {
  const res = await fetch(node.api + path, {
    method,
    headers: body === undefined ? {} : { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // Not JSON (e.g. an empty body): kept as text.
  }
  return { status: res.status, body: parsed };
}

/** Resolves with the first `event` of `emitter` (a Client) within `ms`, else rejects. */
export function next(emitter, event, ms = 10000) {
  return new Promise((resolveNext, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (payload) => {
      clearTimeout(timer);
      off();
      resolveNext(payload);
    });
  });
}

/** Polls `check` every 20 ms until it returns a truthy value, within `ms`. */
export async function until(check, ms = 10000, what = "condition") {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`${what} not met within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Secret of the nodes started with `args: ["--secret", SECRET]`. */
export const SECRET = "shardcast-js-test-secret";

/** An HS256 JWT with `claims`, signed with `secret`. */
export function jwt(claims, secret = SECRET) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Seconds since the Unix epoch, `offset` from now. */
export function epoch(offset = 0) {
  return Math.floor(Date.now() / 1000) + offset;
}

/**
 * Publishes `count` messages through `node`'s API, `concurrency` requests at a time on keep-alive
 * connections (node:http: `fetch` sends a POST's headers and body in two writes and waits out
 * delayed ACKs, ~370 requests/s here). Each request names `topics`, so it makes one message
 * per topic.
 */
export async function publishMany(node, topics, count, concurrency = 16) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const url = new URL(node.api);
  const post = (body) =>
    new Promise((done, fail) => {
      const data = JSON.stringify(body);
      const req = http.request(
        {
          host: url.hostname,
          port: url.port,
          path: "/v1/publish",
          method: "POST",
          agent,
          headers: {
            "content-type": "application/json",
            "content-length": Buffer.byteLength(data),
          },
        },
        (res) => {
          res.resume();
          res.on("end", () =>
            res.statusCode === 202 ? done() : fail(new Error(`publish: ${res.statusCode}`)),
          );
        },
      );
      req.on("error", fail);
      req.end(data);
    });
  let calls = 0;
  const worker = async () => {
    while (calls < count / topics.length) await post({ topics, data: { n: calls++ } });
  };
  try {
    await Promise.all(Array.from({ length: concurrency }, worker));
  } finally {
    agent.destroy();
  }
}

/**
 * A TCP proxy in front of `target` ("host:port") whose connections can be cut, as a network
 * change cuts a phone's: `cut()` destroys every connection and refuses new ones until
 * `restore()`; `restore(other)` sends new connections to another node, as a load balancer
 * does when a node dies.
 */
export async function flakyProxy(target) {
  let [host, port] = target.split(":");
  const sockets = new Set();
  let up = true;
  const server = net.createServer((inbound) => {
    if (!up) return inbound.destroy();
    const outbound = net.connect(Number(port), host);
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  return {
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    cut() {
      up = false;
      for (const s of sockets) s.destroy();
    },
    restore(other) {
      if (other) [host, port] = other.split(":");
      up = true;
    },
    close() {
      this.cut();
      server.close();
    },
  };
}

/**
 * A throwaway `redis-server` on a free loopback port; resolves with its URL and `stop()`.
 */
export async function startRedis() {
  const port = await new Promise((done) => {
    const probe = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => done(port));
    });
  });
  const proc = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: "ignore" },
  );
  const url = `redis://127.0.0.1:${port}`;
  await until(
    () =>
      new Promise((done) => {
        const socket = net.connect(port, "127.0.0.1", () => {
          socket.end();
          done(true);
        });
        socket.on("error", () => done(false));
      }),
    10000,
    "redis-server listening",
  );
  return {
    url,
    stop() {
      proc.kill("SIGKILL");
    },
  };
}
