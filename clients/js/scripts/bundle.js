// Bundles the SDK for browsers: minified ES modules in dist/, one per entry point
// (shardcast.min.js: the client; shardcast-tabs.min.js: the tabs helper), with the code they
// share (ShardcastError, the event emitter) in one chunk that both import, so that a page
// loading both has one ShardcastError class. Prints what a page loading each entry fetches,
// raw and gzipped, and fails when the client is over its budget.
//
// Also bundles the client alone into one module for the demo page a --dev node serves
// (src/demo/shardcast.js, compiled into the binary): with --write-demo it writes that file,
// otherwise it fails when the committed copy differs from a fresh bundle.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";
import { readFileSync, writeFileSync } from "node:fs";

const BUDGET_GZIP = 8 * 1024;

const result = await build({
  entryPoints: { "shardcast.min": "dist/index.js", "shardcast-tabs.min": "dist/tabs.js" },
  outdir: "dist",
  chunkNames: "shardcast-shared-[hash].min",
  bundle: true,
  splitting: true,
  minify: true,
  format: "esm",
  target: "es2020",
  legalComments: "none",
  metafile: true,
});

const { outputs } = result.metafile;
for (const [file, output] of Object.entries(outputs)) {
  if (!output.entryPoint) continue;
  const files = [file, ...output.imports.map((i) => i.path)];
  let raw = 0;
  let gz = 0;
  for (const f of files) {
    const bytes = readFileSync(f);
    raw += bytes.length;
    gz += gzipSync(bytes, { level: 9 }).length;
  }
  console.log(`${files.join(" + ")}: ${raw} bytes minified, ${gz} bytes gzipped`);
  if (file.endsWith("/shardcast.min.js") && gz > BUDGET_GZIP) {
    console.error(`over the budget of ${BUDGET_GZIP} bytes gzipped`);
    process.exit(1);
  }
}

const DEMO_SDK = "../../src/demo/shardcast.js";
const demo = await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  legalComments: "none",
  write: false,
});
const fresh = demo.outputFiles[0].text;
if (process.argv.includes("--write-demo")) {
  writeFileSync(DEMO_SDK, fresh);
  console.log(`${DEMO_SDK}: written`);
} else if (readFileSync(DEMO_SDK, "utf8") !== fresh) {
  console.error(`${DEMO_SDK} is stale: run \`node scripts/bundle.js --write-demo\` and commit it`);
  process.exit(1);
}
