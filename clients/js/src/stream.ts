/**
 * Position in one ordered stream (a user's mailbox or a streamed topic) and the duplicate
 * filter for it.
 *
 * A streamed message carries `seq` (1, 2, 3, ... gap-free within an epoch) and `ep` (the
 * epoch). The tracker keeps the highest `seq` up to which every message has been seen (the
 * position a resume asks from) plus the few seen above a gap, so a message that arrives
 * twice is dropped even when the copies straddle a reconnect, and a replayed message that
 * fills a gap is still delivered.
 *
 * @module
 */

/** Where a client is in a stream: the last `seq` seen in epoch `ep`. */
export interface StreamPosition {
  seq: number;
  ep: string;
}

/** Messages remembered above a gap before the gap is given up (the oldest first). */
const MAX_ABOVE_GAP = 256;

/** Duplicate filter and resume position of one stream. */
export class Stream {
  private ep: string | undefined;
  private seq = 0;
  private readonly above = new Set<number>();

  constructor(start?: StreamPosition) {
    if (start) this.settle(start.seq, start.ep);
  }

  /** The position to resume from, once anything of the stream is known. */
  position(): StreamPosition | undefined {
    return this.ep === undefined ? undefined : { seq: this.seq, ep: this.ep };
  }

  /** Whether a message `seq` of epoch `ep` is new (and records it); false for a duplicate. */
  accept(seq: number, ep: string): boolean {
    if (ep !== this.ep) {
      this.ep = ep;
      this.seq = seq - 1;
      this.above.clear();
    }
    if (seq <= this.seq || this.above.has(seq)) return false;
    this.above.add(seq);
    if (this.above.size > MAX_ABOVE_GAP) this.seq = Math.min(...this.above);
    this.advance();
    return true;
  }

  /**
   * Everything up to `seq` of epoch `ep` has been delivered or is gone for good: a resume's
   * or a subscription's ack, or `hello.mailbox` when the client had no position.
   */
  settle(seq: number, ep: string): void {
    if (ep !== this.ep) {
      this.ep = ep;
      this.seq = seq;
      this.above.clear();
    } else if (seq > this.seq) {
      this.seq = seq;
    }
    this.advance();
  }

  private advance(): void {
    for (const s of this.above) if (s <= this.seq) this.above.delete(s);
    while (this.above.delete(this.seq + 1)) this.seq++;
  }
}
