// Test doubles for the client's state machine: a WebSocket the test plays the server of, and
// a clock whose time only moves when the test says so.

/** A fake WebSocket; every instance is recorded in `FakeSocket.all`. */
export class FakeSocket {
  static all = [];

  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }

  constructor(url, protocols) {
    this.url = new URL(url);
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = undefined;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // Server side.

  open(hello = {}) {
    this.readyState = 1;
    this.onopen?.({});
    this.frame({ op: "hello", user: "u", conn: "1", node: "n", hb: 25, ...hello });
  }

  frame(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  /** The server closes (or the handshake failed, when `open` was never called). */
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** The frames sent with op `op`. */
  ops(op) {
    return this.sent.filter((f) => f.op === op);
  }

  /** Answers every request of op `op` not yet answered with `answer(frame)`. */
  answer(op, answer) {
    for (const f of this.ops(op)) {
      if (f.answered) continue;
      f.answered = true;
      this.frame(answer(f));
    }
  }
}

/** A manual clock implementing the client's `Clock`. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextHandle = 1;
  }

  now() {
    return this.time;
  }

  setTimeout(fn, ms) {
    const handle = this.nextHandle++;
    this.timers.set(handle, { at: this.time + Math.max(0, ms), fn });
    return handle;
  }

  clearTimeout(handle) {
    this.timers.delete(handle);
  }

  /**
   * Lets what is pending run, then moves time forward by `ms`, running each timer that falls
   * due, in order.
   */
  async advance(ms) {
    await flush();
    const end = this.time + ms;
    for (;;) {
      let next;
      for (const [handle, t] of this.timers) {
        if (t.at <= end && (!next || t.at < next[1].at)) next = [handle, t];
      }
      if (!next) break;
      this.timers.delete(next[0]);
      this.time = next[1].at;
      next[1].fn();
      await flush();
    }
    this.time = end;
    await flush();
  }
}

/** Lets pending promise callbacks run. */
export function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}
