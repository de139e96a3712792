/**
 * Errors of the shardcast client.
 *
 * Every refused or failed request rejects with a {@link ShardcastError}. Its `code` is the
 * `code` of the server's `err` frame (`bad_request`, `forbidden`, `too_many`, `not_found`,
 * `unavailable`, ...) or one the client makes itself: `timeout` (no answer within the
 * request's timeout), `disconnected` (the connection was lost with the request in flight, or
 * the client was stopped), `unauthorized` (the server refused the credentials and there is
 * no `getToken` to ask for new ones), `unsubscribed` (a subscription's `ready` when its topic
 * was unsubscribed before the server answered), `bad_frame` (on the `error` event: the server
 * sent a frame that is not JSON).
 *
 * @module
 */

/** The `code` of a {@link ShardcastError}: one of the server's or one of the client's own. */
export type ErrorCode =
  | "bad_request"
  | "forbidden"
  | "too_many"
  | "not_found"
  | "unavailable"
  | "timeout"
  | "disconnected"
  | "unauthorized"
  | "unsubscribed"
  | "bad_frame"
  | (string & {});

/** A request refused by the server, or failed on the client's side. */
export class ShardcastError extends Error {
  /** Machine-readable reason; see {@link ErrorCode}. */
  readonly code: ErrorCode;
  /** The topic a refused subscription was for, when that is what failed. */
  readonly topic?: string;

  constructor(code: ErrorCode, message: string, topic?: string) {
    super(message);
    this.name = "ShardcastError";
    this.code = code;
    if (topic !== undefined) this.topic = topic;
  }
}
