/**
 * One shardcast connection per browser instead of one per tab (optional helper).
 *
 * Every tab of an origin creates a {@link SharedClient} with the same `name`. The tabs elect
 * a leader with the Web Locks API (`navigator.locks`): the tab holding the lock owns the one
 * real {@link Client}; the others talk to it over a `BroadcastChannel`. Each tab tells the
 * leader which topics it wants; the leader subscribes to their union and relays
 * publications, direct messages, broadcasts and connection events to every tab; `publish`,
 * `send` and `up` from any tab are carried out by the leader. When the leader's tab closes
 * its lock is released, the next tab in line takes over, connects and collects every tab's
 * topics again (calls in flight during the hand-over fail with `timeout`).
 *
 * Where `navigator.locks` or `BroadcastChannel` is missing, every tab is its own leader.
 *
 * @module
 */

import { Client, type ClientEvents, type Publication, type PublicationHandler } from "./client.js";
import { Emitter } from "./emitter.js";
import { ShardcastError } from "./errors.js";

/** Events relayed to every tab. */
export type SharedEvents = Pick<
  ClientEvents,
  "connected" | "disconnected" | "message" | "broadcast" | "recovered-false"
> & {
  /** This tab became the leader (it holds the connection now). */
  leader: void;
};

const RELAYED = ["connected", "disconnected", "message", "broadcast", "recovered-false"] as const;

type Note =
  | { t: "leader" }
  | { t: "topics"; tab: string; topics: string[] }
  | { t: "pub"; m: Publication }
  | { t: "event"; name: (typeof RELAYED)[number]; payload: unknown }
  | { t: "call"; tab: string; cid: number; method: "publish" | "send" | "up"; args: unknown[] }
  | { t: "reply"; tab: string; cid: number; value?: string; code?: string; message?: string };

interface Locks {
  request(name: string, callback: () => Promise<void>): Promise<void>;
}

/** A client shared by the tabs of one origin; see the module's description. */
export class SharedClient extends Emitter<SharedEvents> {
  /** Whether this tab holds the connection. */
  leader = false;

  private readonly tab = Math.random().toString(36).slice(2);
  private readonly channel: BroadcastChannel | undefined;
  private readonly handlers = new Map<string, Set<PublicationHandler>>();
  private readonly calls = new Map<number, { resolve(v: string): void; reject(e: Error): void }>();
  private nextCall = 1;
  private client: Client | undefined;
  private readonly interest = new Map<string, Set<string>>();
  private readonly subscriptions = new Map<string, { unsubscribe(): void }>();
  private release: (() => void) | undefined;
  private readonly bye = () => this.close();

  /**
   * `create` makes the real client when this tab becomes the leader (it is connected here);
   * `name` names the lock and the channel; `timeout` bounds calls relayed to the leader.
   */
  constructor(
    private readonly create: () => Client,
    private readonly options: { name?: string; timeout?: number } = {},
  ) {
    super();
    const name = options.name ?? "shardcast";
    const locks = (globalThis as { navigator?: { locks?: Locks } }).navigator?.locks;
    if (!locks || typeof BroadcastChannel !== "function") {
      this.lead();
      return;
    }
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (event) => this.hear(event.data as Note);
    void locks.request(name, () => {
      if (!this.channel) return Promise.resolve();
      this.lead();
      return new Promise<void>((resolve) => (this.release = resolve));
    });
    (globalThis as { addEventListener?: (t: string, f: () => void) => void }).addEventListener?.(
      "pagehide",
      this.bye,
    );
  }

  /** Calls `handler` with each publication of `topic` (through the leader's connection). */
  subscribe(topic: string, handler: PublicationHandler): { unsubscribe(): void } {
    let set = this.handlers.get(topic);
    if (!set) this.handlers.set(topic, (set = new Set()));
    const wrapped: PublicationHandler = (m) => handler(m);
    set.add(wrapped);
    this.announce();
    return {
      unsubscribe: () => {
        if (!set!.delete(wrapped) || set!.size > 0) return;
        this.handlers.delete(topic);
        this.announce();
      },
    };
  }

  /** {@link Client.publish}, carried out by the leader. */
  publish(topic: string, data: unknown): Promise<string> {
    return this.call("publish", [topic, data]);
  }

  /** {@link Client.send}, carried out by the leader. */
  send(user: string, data: unknown): Promise<string> {
    return this.call("send", [user, data]);
  }

  /** {@link Client.up}, carried out by the leader. */
  up(data: unknown, options?: { stream?: string }): Promise<string> {
    return this.call("up", [data, options]);
  }

  /** Leaves: a leader disconnects and hands the lock over. */
  close(): void {
    this.handlers.clear();
    this.announce();
    (
      globalThis as { removeEventListener?: (t: string, f: () => void) => void }
    ).removeEventListener?.("pagehide", this.bye);
    this.client?.disconnect();
    this.client = undefined;
    this.channel?.close();
    this.release?.();
  }

  private lead(): void {
    this.leader = true;
    const client = (this.client = this.create());
    for (const name of RELAYED) {
      client.on(name, (payload: unknown) => this.relay({ t: "event", name, payload }));
    }
    this.interest.set(this.tab, new Set(this.handlers.keys()));
    this.resubscribe();
    client.connect().catch(() => {});
    this.post({ t: "leader" });
    this.emit("leader", undefined);
  }

  private hear(note: Note): void {
    switch (note.t) {
      case "leader":
        this.announce();
        return;
      case "topics":
        if (!this.client) return;
        this.interest.set(note.tab, new Set(note.topics));
        this.resubscribe();
        return;
      case "pub":
        this.deliver(note.m);
        return;
      case "event":
        this.emit(note.name, note.payload as never);
        return;
      case "call":
        if (this.client) void this.run(note);
        return;
      case "reply": {
        const call = note.tab === this.tab ? this.calls.get(note.cid) : undefined;
        if (!call) return;
        this.calls.delete(note.cid);
        if (note.code) call.reject(new ShardcastError(note.code, note.message ?? note.code));
        else call.resolve(note.value!);
      }
    }
  }

  /** Leader: subscribe to the union of every tab's topics, drop the rest. */
  private resubscribe(): void {
    const wanted = new Set<string>();
    for (const topics of this.interest.values()) for (const t of topics) wanted.add(t);
    for (const [topic, sub] of this.subscriptions) {
      if (!wanted.has(topic)) {
        sub.unsubscribe();
        this.subscriptions.delete(topic);
      }
    }
    for (const topic of wanted) {
      if (this.subscriptions.has(topic)) continue;
      this.subscriptions.set(
        topic,
        this.client!.subscribe(topic, (m) => this.relay({ t: "pub", m })),
      );
    }
  }

  private async run(note: Extract<Note, { t: "call" }>): Promise<void> {
    const reply: Note = { t: "reply", tab: note.tab, cid: note.cid };
    try {
      reply.value = await (this.client![note.method] as (...a: unknown[]) => Promise<string>)(
        ...note.args,
      );
    } catch (e) {
      reply.code = (e as ShardcastError).code ?? "error";
      reply.message = (e as Error).message;
    }
    this.post(reply);
  }

  private call(method: "publish" | "send" | "up", args: unknown[]): Promise<string> {
    if (this.client) return (this.client[method] as (...a: unknown[]) => Promise<string>)(...args);
    const cid = this.nextCall++;
    const timeout = this.options.timeout ?? 10000;
    return new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.calls.delete(cid);
        reject(
          new ShardcastError(
            "timeout",
            `${method}: no answer from the leading tab in ${timeout} ms`,
          ),
        );
      }, timeout);
      this.calls.set(cid, {
        resolve: (v) => (clearTimeout(timer), resolve(v)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      this.post({ t: "call", tab: this.tab, cid, method, args });
    });
  }

  /** Tells the leader (or, leading, itself) which topics this tab wants. */
  private announce(): void {
    const topics = [...this.handlers.keys()];
    if (this.client) {
      this.interest.set(this.tab, new Set(topics));
      this.resubscribe();
    } else {
      this.post({ t: "topics", tab: this.tab, topics });
    }
  }

  /** Leader: hand a note to every other tab and act on it here. */
  private relay(note: Note): void {
    this.post(note);
    this.hear(note);
  }

  private deliver(m: Publication): void {
    for (const handler of this.handlers.get(m.topic!) ?? []) handler(m);
  }

  private post(note: Note): void {
    this.channel?.postMessage(note);
  }
}
