/**
 * `@shardcast/client`: the JavaScript/TypeScript client of shardcast, for browsers and Node,
 * with no runtime dependencies. See {@link Client}.
 *
 * @module
 */

export { Client } from "./client.js";
export type {
  Ack,
  ClientEvents,
  ClientOptions,
  Clock,
  DirectMessage,
  DisconnectInfo,
  Hello,
  Publication,
  PublicationHandler,
  RecoveryInfo,
  RequestOptions,
  State,
  Subscription,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { ShardcastError } from "./errors.js";
export type { ErrorCode } from "./errors.js";
export type { StreamPosition } from "./stream.js";
