// The SDK's own cost per received publication, in Node: frames are handed to a connected
// client through a fake socket (no network), against JSON.parse alone as the floor.
import { Client } from "../dist/index.js";
import { FakeSocket } from "../test/fakes.js";

const N = 200000;
const client = new Client("ws://bench.invalid/ws", { WebSocket: FakeSocket });
const ready = client.connect();
await new Promise((resolve) => setImmediate(resolve));
const ws = FakeSocket.last();
ws.open();
await ready;
let received = 0;
client.subscribe("t", () => received++);
const frames = Array.from({ length: N }, (_, i) =>
  JSON.stringify({
    op: "pub",
    topic: "t",
    mid: String(1e15 + i),
    ts: 1,
    data: { n: i, text: "hello" },
  }),
);

function run(name, fn) {
  const start = performance.now();
  fn();
  const ms = performance.now() - start;
  console.log(
    `${name}: ${Math.round((N / ms) * 1000)} messages/s, ${((ms * 1000) / N).toFixed(2)} µs each`,
  );
}

for (let round = 0; round < 2; round++) {
  run("SDK (parse, route, duplicate check, handler)", () => {
    for (const data of frames) ws.onmessage({ data });
  });
  run("JSON.parse alone", () => {
    for (const data of frames) JSON.parse(data);
  });
}
if (received !== 2 * N) throw new Error(`handler saw ${received} of ${2 * N}`);
client.disconnect();
