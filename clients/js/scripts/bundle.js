// Bundles the SDK for browsers (one minified ES module per entry, in dist/) and prints
// each bundle's size, raw and gzipped. Fails when the client bundle is over its budget.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { readFileSync } from "node:fs";

const BUDGET_GZIP = 8 * 1024;

for (const [entry, out] of [
  ["dist/index.js", "dist/shardcast.min.js"],
  ["dist/tabs.js", "dist/shardcast-tabs.min.js"],
]) {
  await build({
    entryPoints: [entry],
    outfile: out,
    bundle: true,
    minify: true,
    format: "esm",
    target: "es2020",
    legalComments: "none",
  });
  const bytes = readFileSync(out);
  const gz = gzipSync(bytes, { level: 9 }).length;
  console.log(`${out}: ${bytes.length} bytes minified, ${gz} bytes gzipped`);
  if (out.endsWith("shardcast.min.js") && gz > BUDGET_GZIP) {
    console.error(`over the budget of ${BUDGET_GZIP} bytes gzipped`);
    process.exit(1);
  }
}
