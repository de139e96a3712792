// Compile-time check of the published types from a TypeScript consumer's side
// (`tsc -p test/tsconfig.json`, no output): the sockets of browsers and of `ws` fit the
// client's options, and events, errors and results have the types the README promises.
import WebSocket from "ws";
import {
  Client,
  ShardcastError,
  type Hello,
  type Publication,
  type DisconnectInfo,
} from "../dist/index.js";
import { SharedClient } from "../dist/tabs.js";

const node = new Client("ws://127.0.0.1:8080/ws", { WebSocket, getToken: async () => "t" });
const browser = new Client("/ws", {
  WebSocket: globalThis.WebSocket,
  token: "t",
  protocol: "shardcast.v1",
});

async function use(client: Client): Promise<void> {
  const hello: Hello = await client.connect();
  const hb: number = hello.hb;
  const sub = client.subscribe("room", (m: Publication) => m.data, { since: { seq: 0, ep: "" } });
  const recovered: boolean | undefined = (await sub.ready).recovered;
  sub.unsubscribe();
  const mid: string = await client.publish("room", { hb, recovered });
  await client.send("bob", mid);
  await client.up({ x: 1 }, { stream: "orders", timeout: 1000 });
  const rtt: number = await client.ping();
  const off = client.on("disconnected", (info: DisconnectInfo) => info.code + rtt);
  off();
  client.on("error", (e) => {
    if (e instanceof ShardcastError && e.code === "too_many") e.topic?.toUpperCase();
  });
  client.on("message", (m) => m.from);
  client.on("recovered-false", (r) => r.topic);
  client.disconnect();
}

const shared = new SharedClient(() => browser, { name: "app" });
shared.subscribe("room", (m) => m.mid).unsubscribe();
shared.on("leader", () => shared.leader);
void shared.publish("room", 1).then((mid: string) => mid);
void use(node);
