/**
 * The shardcast client: one WebSocket to a shardcast node, kept up across failures.
 *
 * - Requests (`sub`, `pub`, `send`, `up`, `ping`, `refresh`) carry an `id`; the server's
 *   `ack`, `err` or `pong` with that `id` settles the request's promise. A request made while
 *   the client is (re)connecting waits for the connection, within its timeout.
 * - Reconnects: exponential backoff with full jitter; a prompt, slightly spread reconnect
 *   after 1001 (node going away); none after 4001 (replaced) or 4003 (kicked).
 * - After every reconnect: each topic is subscribed again and the mailbox and streamed
 *   topics resume from the last `seq`/`ep` seen; duplicates are dropped by `seq`. A server
 *   that sends no `seq`/`ep` (protocol v1) is resumed from nothing: only `sub` is sent.
 * - Liveness: a connection that hears no frame for `hello.hb` seconds is sent an
 *   application ping (browsers do not expose WebSocket pings); one still silent after a
 *   margin is replaced.
 * - Tokens: `?token=` on the URL; `getToken()` is asked for a fresh one after an auth
 *   failure (close 4401/4402, or a handshake that failed) and before `hello.exp`, when the
 *   new token is handed to the live connection with `refresh`.
 *
 * @module
 */

import { Emitter } from "./emitter.js";
import { ShardcastError } from "./errors.js";
import { Stream, type StreamPosition } from "./stream.js";

/** The `hello` frame: the first one after the upgrade. */

/** The subprotocol of protocol v1.1, offered by default. */
const SUBPROTOCOL = "shardcast.v1";
export interface Hello {
  op: "hello";
  user: string;
  conn: string;
  node: string;
  /** Heartbeat interval, seconds. */
  hb: number;
  /** The token's expiry, seconds since the Unix epoch (protocol v1.1). */
  exp?: number;
  /** The mailbox's last position (protocol v1.1). */
  mailbox?: StreamPosition;
}

/** A direct message (`msg`): from another user's `send` or a backend's publish. */
export interface DirectMessage {
  op: "msg";
  /** The sending user; absent when a backend sent it. */
  from?: string;
  to: string;
  mid: string;
  ts: number;
  data: unknown;
  seq?: number;
  ep?: string;
}

/** A topic publication or, without `topic`, a broadcast (`pub`). */
export interface Publication {
  op: "pub";
  topic?: string;
  mid: string;
  ts: number;
  data: unknown;
  seq?: number;
  ep?: string;
}

/** What the server's `ack` of a subscription or resume said. */
export interface Ack {
  op: "ack";
  id?: number | string;
  mid?: string;
  /** Protocol v1.1, acks of `since`: whether every message after it was replayed. */
  recovered?: boolean;
  seq?: number;
  ep?: string;
}

/**
 * The part of the WebSocket API the client uses (browsers' `WebSocket`, the `ws` package).
 * The handlers' events are typed `any` so that every implementation's own event types fit;
 * the client reads `data` of a message event and `code`/`reason` of a close event.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
}

/** A WebSocket constructor: `globalThis.WebSocket`, or `ws`'s in Node. */
export type WebSocketConstructor = new (
  url: string,
  protocols?: string | string[],
) => WebSocketLike;

/** Time source and timers; injectable so that tests can drive a fake clock. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** Options of {@link Client}. Durations are milliseconds. */
export interface ClientOptions {
  /** Token sent as `?token=`. */
  token?: string;
  /**
   * Returns a fresh token: called before the first connection when there is no `token`,
   * after an auth failure (close 4401/4402 or a failed handshake) and shortly before the
   * token's `exp`.
   */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; default `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /**
   * Subprotocol to offer. Default `"shardcast.v1"`, which a v1.1 node answers (and then
   * reports refused credentials as closes 4401/4402 a page can read); `null` offers none,
   * for a v1 node (a browser aborts a connection whose offered subprotocol is not answered).
   */
  protocol?: string | null;
  /** Default timeout of a request. Default 10000. */
  requestTimeout?: number;
  /** Longest a connection attempt may take, up to `hello`. Default 10000. */
  connectTimeout?: number;
  /** Backoff: the first reconnect waits up to this long (full jitter). Default 500. */
  minReconnectDelay?: number;
  /** Backoff: the longest wait between attempts. Default 30000. */
  maxReconnectDelay?: number;
  /** After close 1001 (node going away), reconnect within this long (random). Default 1000. */
  drainReconnectDelay?: number;
  /** A connection silent for `hello.hb` seconds plus this margin is replaced. Default 10000. */
  livenessMargin?: number;
  /** Refresh the token this long before its `exp` (at most half its remaining life). Default 30000. */
  refreshBefore?: number;
  /** Mailbox position to resume from on the first connection (e.g. one saved by the app). */
  mailbox?: StreamPosition;
  /** Reconnect after a lost connection. Default true. */
  reconnect?: boolean;
  /** Clock and timers; default the platform's. */
  clock?: Clock;
  /** Random numbers in [0, 1) for jitter; default `Math.random`. */
  random?: () => number;
}

/** Per-request options. */
export interface RequestOptions {
  /** Timeout of this request; default the client's `requestTimeout`. */
  timeout?: number;
}

/** Payload of the `disconnected` event. */
export interface DisconnectInfo {
  /** Close code; 1006 when the connection was lost without one (or found dead). */
  code: number;
  reason: string;
  /** Whether the client will reconnect by itself. */
  reconnect: boolean;
}

/** Payload of the `recovered-false` event: a resume could not replay everything missed. */
export interface RecoveryInfo {
  /** The topic; absent for the mailbox. */
  topic?: string;
  /** The stream's current position, from the server. */
  seq?: number;
  ep?: string;
}

/** Events of a {@link Client}, with their payloads. */
export interface ClientEvents {
  /** A connection is up (`hello` received). */
  connected: Hello;
  /** A connection that was up is gone, or the client gave up reconnecting. */
  disconnected: DisconnectInfo;
  /** The next connection attempt is scheduled. */
  reconnecting: { attempt: number; delay: number };
  /** A direct message. */
  message: DirectMessage;
  /** A broadcast (a `pub` without a topic). */
  broadcast: Publication;
  /** A refusal or failure nobody awaits: a subscription refused, a token refresh failed, ... */
  error: Error;
  /** Messages were missed and cannot be replayed: reload state from the backend. */
  "recovered-false": RecoveryInfo;
}

/** The client's state. */
export type State = "idle" | "connecting" | "connected" | "waiting";

/** Handler of a topic's publications. */
export type PublicationHandler = (message: Publication) => void;

/** One handler's subscription to a topic; see {@link Client.subscribe}. */
export interface Subscription {
  readonly topic: string;
  /**
   * Settles with the server's first answer to the topic's `sub`: resolves with the `ack`,
   * rejects with a {@link ShardcastError} when the server refused it (the subscription is
   * then gone), the client was stopped first (`disconnected`) or the topic's last handler
   * unsubscribed first (`unsubscribed`).
   */
  readonly ready: Promise<Ack>;
  /** Stops this handler; the last handler of a topic unsubscribes it from the server. */
  unsubscribe(): void;
}

/** Closed by the server, never followed by a reconnect: replaced (device limit), kicked. */
const FINAL_CLOSES = new Set([4001, 4003]);
/** Closed for credentials: a new token is needed. */
const AUTH_CLOSES = new Set([4401, 4402]);
/** A connection up this long resets the backoff. */
const STABLE_MS = 5000;

interface Pending {
  /** Settles the request from the server's answer. */
  settle(frame: Frame): void;
  fail(error: ShardcastError): void;
  /** Requests the application awaits fail when the connection is lost; state ones are re-sent. */
  user: boolean;
  timer?: unknown;
}

interface Topic {
  handlers: Set<PublicationHandler>;
  stream: Stream;
  /** The ack of the topic's last `sub`, once there is one. */
  ack?: Ack;
  /** Subscriptions waiting for their first ack. */
  waiting: Array<{ resolve(ack: Ack): void; reject(error: Error): void }>;
}

type Frame = { op?: unknown; id?: unknown; [key: string]: unknown };

const defaultClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

const noop = () => {};

/** The `exp` claim of a JWT, when it has one. */
function tokenExp(token: string): number | undefined {
  try {
    const claims = JSON.parse(atob(token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/")));
    return typeof claims.exp === "number" ? claims.exp : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A shardcast connection that keeps itself up.
 *
 * ```js
 * const client = new Client("wss://push.example.com/ws", { getToken: fetchToken });
 * client.subscribe("room.1", (m) => console.log(m.data));
 * client.on("message", (m) => console.log("from", m.from, m.data));
 * await client.connect();
 * await client.publish("room.1", { text: "hi" });
 * ```
 */
export class Client extends Emitter<ClientEvents> {
  /** Current state. */
  state: State = "idle";
  /** The last `hello`, while connected. */
  hello: Hello | undefined;

  private readonly url: URL;
  private readonly opts: Required<
    Omit<ClientOptions, "token" | "getToken" | "WebSocket" | "protocol" | "mailbox" | "clock">
  >;
  private readonly getToken: (() => string | Promise<string>) | undefined;
  private readonly WebSocketImpl: WebSocketConstructor | undefined;
  private readonly protocol: string | undefined;
  private readonly clock: Clock;
  private token: string | undefined;
  private needToken = false;

  private ws: WebSocketLike | undefined;
  /** Counts attempts, so that an attempt overtaken while it awaited `getToken` gives up. */
  private generation = 0;
  private attempt = 0;
  private connectedAt = 0;
  private lastRx = 0;
  private pingedFor = -1;
  private timer: unknown;
  private refreshTimer: unknown;

  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly queue: Array<{ id: number; frame: Frame }> = [];
  private readonly topics = new Map<string, Topic>();
  private readonly mailbox: Stream;
  private waiters: Array<{ resolve(hello: Hello): void; reject(error: Error): void }> = [];
  private unlisten: (() => void) | undefined;

  constructor(url: string, options: ClientOptions = {}) {
    super();
    this.url = new URL(url, (globalThis as { location?: { href: string } }).location?.href);
    this.url.protocol = this.url.protocol.replace(/^http/, "ws");
    this.token = options.token;
    this.getToken = options.getToken;
    this.WebSocketImpl =
      options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.protocol = options.protocol === undefined ? SUBPROTOCOL : (options.protocol ?? undefined);
    this.mailbox = new Stream(options.mailbox);
    this.clock = options.clock ?? defaultClock;
    this.opts = {
      requestTimeout: options.requestTimeout ?? 10000,
      connectTimeout: options.connectTimeout ?? 10000,
      minReconnectDelay: options.minReconnectDelay ?? 500,
      maxReconnectDelay: options.maxReconnectDelay ?? 30000,
      drainReconnectDelay: options.drainReconnectDelay ?? 1000,
      livenessMargin: options.livenessMargin ?? 10000,
      refreshBefore: options.refreshBefore ?? 30000,
      reconnect: options.reconnect ?? true,
      random: options.random ?? Math.random,
    };
  }

  /** The mailbox position to save for a later `mailbox` option, once one is known. */
  get mailboxPosition(): StreamPosition | undefined {
    return this.mailbox.position();
  }

  /**
   * Starts connecting (and reconnecting); resolves with the `hello` of the first connection,
   * rejects when the client is stopped or gives up before one.
   */
  connect(): Promise<Hello> {
    if (this.state === "connected") return Promise.resolve(this.hello!);
    const ready = new Promise<Hello>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (this.state === "idle") {
      this.attempt = 0;
      this.listen();
      void this.open();
    }
    return ready;
  }

  /** Closes the connection (1000) and stops reconnecting; pending requests fail `disconnected`. */
  disconnect(): void {
    const wasConnected = this.state === "connected";
    if (this.ws) this.drop(1000, "client disconnect");
    this.stop(1000, "client disconnect", wasConnected);
  }

  /**
   * Calls `handler` with each publication of `topic`; the topic is subscribed on the server
   * now (when connected) and again after every reconnect. `since` asks, with the topic's
   * first `sub`, for the retained messages after a position (`{seq: 0, ep: ""}`: all).
   */
  subscribe(
    topic: string,
    handler: PublicationHandler,
    options: { since?: StreamPosition } = {},
  ): Subscription {
    let state = this.topics.get(topic);
    const fresh = !state;
    if (!state) {
      state = { handlers: new Set(), stream: new Stream(options.since), waiting: [] };
      this.topics.set(topic, state);
    }
    const entry = state;
    const wrapped: PublicationHandler = (m) => handler(m);
    entry.handlers.add(wrapped);
    const ready = entry.ack
      ? Promise.resolve(entry.ack)
      : new Promise<Ack>((resolve, reject) => entry.waiting.push({ resolve, reject }));
    ready.catch(noop);
    if (fresh && this.state === "connected") this.sendSub(topic, entry);
    return {
      topic,
      ready,
      unsubscribe: () => {
        if (!entry.handlers.delete(wrapped) || entry.handlers.size > 0) return;
        if (this.topics.get(topic) !== entry) return;
        this.topics.delete(topic);
        const early = new ShardcastError(
          "unsubscribed",
          `sub ${topic}: unsubscribed before an answer`,
          topic,
        );
        for (const w of entry.waiting.splice(0)) w.reject(early);
        if (this.state === "connected") this.control({ op: "unsub", topic }, noop);
      },
    };
  }

  /** Publishes `data` to `topic`; resolves with the message id. */
  publish(topic: string, data: unknown, options?: RequestOptions): Promise<string> {
    return this.request({ op: "pub", topic, data }, options).then((ack) => ack.mid as string);
  }

  /** Sends `data` to every device of `user` (and the sender's other devices); resolves with the message id. */
  send(user: string, data: unknown, options?: RequestOptions): Promise<string> {
    return this.request({ op: "send", to: user, data }, options).then((ack) => ack.mid as string);
  }

  /**
   * Hands `data` to the backends (protocol v1.1), on `stream` (default `up`); resolves with
   * the message id once the server's sink accepted it.
   */
  up(data: unknown, options: RequestOptions & { stream?: string } = {}): Promise<string> {
    const frame: Frame = { op: "up", data };
    if (options.stream !== undefined) frame.stream = options.stream;
    return this.request(frame, options).then((ack) => ack.mid as string);
  }

  /** Application ping; resolves with the round trip in milliseconds. */
  ping(options?: RequestOptions): Promise<number> {
    const start = this.clock.now();
    return this.request({ op: "ping" }, options).then(() => this.clock.now() - start);
  }

  /** Sends a request and settles with its `ack` (or `pong`); see {@link ShardcastError}. */
  private request(frame: Frame, options: RequestOptions = {}): Promise<Ack> {
    if (this.state === "idle") {
      return Promise.reject(new ShardcastError("disconnected", "not connected"));
    }
    return new Promise<Ack>((resolve, reject) => {
      const id = this.nextId++;
      const timeout = options.timeout ?? this.opts.requestTimeout;
      const entry: Pending = {
        settle: (answer) => {
          this.forget(id);
          if (answer.op === "err") {
            reject(new ShardcastError(String(answer.code), String(answer.msg ?? answer.code)));
          } else {
            resolve(answer as unknown as Ack);
          }
        },
        fail: (error) => {
          this.forget(id);
          reject(error);
        },
        user: true,
        timer: this.clock.setTimeout(
          () =>
            entry.fail(new ShardcastError("timeout", `${frame.op}: no answer in ${timeout} ms`)),
          timeout,
        ),
      };
      this.pending.set(id, entry);
      const withId = { ...frame, id };
      if (this.state === "connected") this.write(withId);
      else this.queue.push({ id, frame: withId });
    });
  }

  /** Sends a frame whose answer only updates the client's state (sub, unsub, resume). */
  private control(frame: Frame, settle: (answer: Frame) => void): void {
    const id = this.nextId++;
    this.pending.set(id, {
      settle: (answer) => {
        this.pending.delete(id);
        settle(answer);
      },
      fail: () => this.pending.delete(id),
      user: false,
    });
    this.write({ ...frame, id });
  }

  private forget(id: number): void {
    const entry = this.pending.get(id);
    if (!entry) return;
    this.pending.delete(id);
    if (entry.timer !== undefined) this.clock.clearTimeout(entry.timer);
    const queued = this.queue.findIndex((q) => q.id === id);
    if (queued >= 0) this.queue.splice(queued, 1);
  }

  private write(frame: Frame): void {
    try {
      this.ws?.send(JSON.stringify(frame));
    } catch (e) {
      this.emit("error", e as Error);
    }
  }

  private sendSub(topic: string, entry: Topic): void {
    const frame: Frame = { op: "sub", topic };
    const since = entry.stream.position();
    if (since) frame.since = since;
    this.control(frame, (answer) => {
      if (this.topics.get(topic) !== entry) return;
      if (answer.op === "err") {
        this.topics.delete(topic);
        const error = new ShardcastError(
          String(answer.code),
          `sub ${topic}: ${String(answer.msg ?? answer.code)}`,
          topic,
        );
        for (const w of entry.waiting.splice(0)) w.reject(error);
        this.emit("error", error);
        return;
      }
      const ack = answer as unknown as Ack;
      entry.ack = ack;
      this.recovered(entry.stream, ack, topic);
      for (const w of entry.waiting.splice(0)) w.resolve(ack);
    });
  }

  /** Applies the position an ack reports and surfaces `recovered: false`. */
  private recovered(stream: Stream, ack: Ack, topic?: string): void {
    if (typeof ack.seq === "number" && typeof ack.ep === "string") stream.settle(ack.seq, ack.ep);
    if (ack.recovered === false) {
      const info: RecoveryInfo = {};
      if (topic !== undefined) info.topic = topic;
      if (ack.seq !== undefined) info.seq = ack.seq;
      if (ack.ep !== undefined) info.ep = ack.ep;
      this.emit("recovered-false", info);
    }
  }

  /** One connection attempt: a token if one is needed, then the socket. */
  private async open(): Promise<void> {
    this.state = "connecting";
    const generation = ++this.generation;
    if (this.getToken && (this.needToken || this.token === undefined)) {
      try {
        this.token = await this.getToken();
        this.needToken = false;
      } catch (e) {
        if (generation !== this.generation || this.state !== "connecting") return;
        this.emit("error", e as Error);
        this.retry(1006, "getToken failed");
        return;
      }
      if (generation !== this.generation || this.state !== "connecting") return;
    }
    if (!this.WebSocketImpl) {
      this.stop(1006, "no WebSocket implementation: pass options.WebSocket", false);
      return;
    }
    const url = new URL(this.url.href);
    if (this.token !== undefined) url.searchParams.set("token", this.token);
    let ws: WebSocketLike;
    try {
      ws = this.protocol
        ? new this.WebSocketImpl(url.toString(), this.protocol)
        : new this.WebSocketImpl(url.toString());
    } catch (e) {
      this.emit("error", e as Error);
      this.retry(1006, "WebSocket constructor failed");
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
    };
    ws.onmessage = (event: { data: unknown }) => {
      if (this.ws === ws) this.receive(event.data);
    };
    ws.onerror = noop;
    ws.onclose = (event: { code: number; reason: string }) => {
      if (this.ws !== ws) return;
      this.ws = undefined;
      this.lost(event.code, event.reason, opened);
    };
    this.arm(this.opts.connectTimeout);
  }

  private receive(data: unknown): void {
    this.lastRx = this.clock.now();
    let frame: Frame;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.emit("error", new ShardcastError("bad_frame", "a frame that is not JSON"));
      return;
    }
    switch (frame.op) {
      case "pub": {
        const m = frame as unknown as Publication;
        if (m.topic === undefined) {
          this.emit("broadcast", m);
          return;
        }
        const entry = this.topics.get(m.topic);
        if (!entry || !this.fresh(entry.stream, m)) return;
        for (const handler of entry.handlers) {
          try {
            handler(m);
          } catch (e) {
            queueMicrotask(() => {
              throw e;
            });
          }
        }
        return;
      }
      case "msg": {
        const m = frame as unknown as DirectMessage;
        if (this.fresh(this.mailbox, m)) this.emit("message", m);
        return;
      }
      case "ack":
      case "err":
      case "pong": {
        const entry = typeof frame.id === "number" ? this.pending.get(frame.id) : undefined;
        if (entry) entry.settle(frame);
        else if (frame.op === "err" && frame.id === undefined) {
          this.emit(
            "error",
            new ShardcastError(String(frame.code), String(frame.msg ?? frame.code)),
          );
        }
        return;
      }
      case "hello":
        this.welcome(frame as unknown as Hello);
        return;
    }
  }

  /** Whether a message is new to its stream (messages without `seq`/`ep` always are). */
  private fresh(stream: Stream, m: { seq?: number; ep?: string }): boolean {
    return typeof m.seq !== "number" || typeof m.ep !== "string" || stream.accept(m.seq, m.ep);
  }

  private welcome(hello: Hello): void {
    if (this.state !== "connecting") return;
    this.state = "connected";
    this.hello = hello;
    this.connectedAt = this.clock.now();
    this.pingedFor = -1;
    this.clock.clearTimeout(this.timer);
    this.timer = undefined;
    const since = this.mailbox.position();
    if (since) {
      this.control({ op: "resume", since }, (answer) => {
        if (answer.op === "err") {
          this.emit(
            "error",
            new ShardcastError(String(answer.code), `resume: ${String(answer.msg)}`),
          );
        } else this.recovered(this.mailbox, answer as unknown as Ack);
      });
    } else if (hello.mailbox) {
      this.mailbox.settle(hello.mailbox.seq, hello.mailbox.ep);
    }
    for (const [topic, entry] of this.topics) this.sendSub(topic, entry);
    for (const { frame } of this.queue.splice(0)) this.write(frame);
    this.scheduleRefresh(hello.exp);
    this.check();
    for (const w of this.waiters.splice(0)) w.resolve(hello);
    this.emit("connected", hello);
  }

  /** Arms the one connection timer: connect timeout, then liveness. */
  private arm(ms: number): void {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined;
      if (this.state === "connecting") this.drop(1006, "connect timeout");
      else if (this.state === "connected") this.check();
    }, ms);
  }

  /** Liveness: ping a connection silent for `hb`, replace one silent for `hb` + margin. */
  private check(): void {
    const hbMs = (this.hello?.hb ?? 0) * 1000;
    if (hbMs <= 0) return;
    const silent = this.clock.now() - Math.max(this.lastRx, this.connectedAt);
    const deadline = hbMs + this.opts.livenessMargin;
    if (silent >= deadline) {
      this.drop(1006, "liveness timeout");
    } else if (silent >= hbMs) {
      if (this.pingedFor !== this.lastRx) {
        this.pingedFor = this.lastRx;
        this.write({ op: "ping" });
      }
      this.arm(deadline - silent);
    } else {
      this.arm(hbMs - silent);
    }
  }

  /** Closes the current socket without waiting for it, and handles the loss now. */
  private drop(code: number, reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    this.ws = undefined;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(code === 1000 ? 1000 : 4000, reason);
    } catch {
      // A socket still connecting may refuse a close code; it is abandoned all the same.
    }
    if (code !== 1000) this.lost(code, reason, true);
  }

  /** The socket is gone: decide whether and when to reconnect. */
  private lost(code: number, reason: string, opened: boolean): void {
    const wasConnected = this.state === "connected";
    if (wasConnected && this.clock.now() - this.connectedAt >= STABLE_MS) this.attempt = 0;
    this.idle();
    for (const [, entry] of this.pending) {
      if (!entry.user) entry.fail(new ShardcastError("disconnected", reason));
    }
    for (const [id, entry] of [...this.pending]) {
      if (entry.user && !this.queue.some((q) => q.id === id)) {
        entry.fail(
          new ShardcastError("disconnected", `connection lost (${code}) before an answer`),
        );
      }
    }
    if (AUTH_CLOSES.has(code) || !opened) this.needToken = true;
    const final =
      FINAL_CLOSES.has(code) || !this.opts.reconnect || (AUTH_CLOSES.has(code) && !this.getToken);
    if (final) {
      if (AUTH_CLOSES.has(code)) {
        this.emit("error", new ShardcastError("unauthorized", `closed ${code}: ${reason}`));
      }
      this.stop(code, reason, wasConnected);
      return;
    }
    if (wasConnected) this.emit("disconnected", { code, reason, reconnect: true });
    if (code === 1001) {
      this.attempt = 0;
      this.schedule(this.opts.random() * this.opts.drainReconnectDelay);
    } else {
      this.retry(code, reason);
    }
  }

  /** Schedules the next attempt after a backoff: full jitter over an exponential cap. */
  private retry(code: number, reason: string): void {
    if (!this.opts.reconnect) {
      this.stop(code, reason, false);
      return;
    }
    const cap = Math.min(
      this.opts.maxReconnectDelay,
      this.opts.minReconnectDelay * 2 ** Math.min(this.attempt, 30),
    );
    this.schedule(this.opts.random() * cap);
  }

  private schedule(delay: number): void {
    this.attempt++;
    this.state = "waiting";
    this.clearTimers();
    this.timer = this.clock.setTimeout(() => {
      this.timer = undefined;
      if (this.state === "waiting") void this.open();
    }, delay);
    this.emit("reconnecting", { attempt: this.attempt, delay });
  }

  /** Reconnects now if waiting for a backoff (network back, page visible again). */
  private wake(): void {
    if (this.state === "waiting") {
      this.clearTimers();
      void this.open();
    } else if (this.state === "connected") {
      this.check();
    }
  }

  private scheduleRefresh(exp: number | undefined): void {
    if (this.refreshTimer !== undefined) this.clock.clearTimeout(this.refreshTimer);
    this.refreshTimer = undefined;
    if (exp === undefined || !this.getToken) return;
    const left = exp * 1000 - this.clock.now();
    const delay = Math.max(0, left - Math.min(this.opts.refreshBefore, left / 2));
    this.refreshTimer = this.clock.setTimeout(() => {
      this.refreshTimer = undefined;
      void this.refresh();
    }, delay);
  }

  private async refresh(): Promise<void> {
    try {
      const token = await this.getToken!();
      this.token = token;
      await this.request({ op: "refresh", token });
      this.scheduleRefresh(tokenExp(token));
    } catch (e) {
      if (this.state === "connected") this.emit("error", e as Error);
    }
  }

  private clearTimers(): void {
    if (this.timer !== undefined) this.clock.clearTimeout(this.timer);
    if (this.refreshTimer !== undefined) this.clock.clearTimeout(this.refreshTimer);
    this.timer = this.refreshTimer = undefined;
  }

  /** No connection (any more): timers off, `hello` gone. */
  private idle(): void {
    this.clearTimers();
    this.hello = undefined;
  }

  /** Stops for good: everything pending fails, waiting `connect()`s reject. */
  private stop(code: number, reason: string, wasConnected: boolean): void {
    this.idle();
    this.state = "idle";
    this.unlisten?.();
    this.unlisten = undefined;
    this.queue.length = 0;
    const error = new ShardcastError("disconnected", `stopped: ${reason} (${code})`);
    for (const [, entry] of [...this.pending]) entry.fail(error);
    for (const w of this.waiters.splice(0)) w.reject(error);
    for (const entry of this.topics.values()) {
      if (!entry.ack) {
        for (const w of entry.waiting.splice(0)) w.reject(error);
      }
    }
    if (wasConnected || code !== 1000)
      this.emit("disconnected", { code, reason, reconnect: false });
  }

  /** Browser hooks: network back online or page visible again → wake; offline → drop. */
  private listen(): void {
    const g = globalThis as {
      addEventListener?: (type: string, fn: () => void) => void;
      removeEventListener?: (type: string, fn: () => void) => void;
      document?: { visibilityState?: string };
    };
    if (typeof g.addEventListener !== "function" || typeof g.removeEventListener !== "function") {
      return;
    }
    const wake = () => this.wake();
    const offline = () => this.drop(1006, "offline");
    const visible = () => {
      if (g.document?.visibilityState === "visible") this.wake();
    };
    g.addEventListener("online", wake);
    g.addEventListener("offline", offline);
    g.addEventListener("visibilitychange", visible);
    this.unlisten = () => {
      g.removeEventListener!("online", wake);
      g.removeEventListener!("offline", offline);
      g.removeEventListener!("visibilitychange", visible);
    };
  }
}
