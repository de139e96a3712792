#!/usr/bin/env bash
# Runs one load-test scenario against a fresh release dev node, then stops the node.
#
#   loadtest/bench.sh SCENARIO [shardcast-loadtest flags...]
#   e.g. loadtest/bench.sh connect --conns 10000 --hold 20
#
# Starts `shardcast serve --dev` on free loopback ports with $NODE_FLAGS (default
# "--shards 2"), passes --url, --api and --pid to
# `shardcast-loadtest SCENARIO`, then SIGTERMs the node and waits for it (SIGKILL after
# 20 s). The scenario's output goes to stdout; its final JSON line is also appended to
# $RESULTS (default /tmp/shardcast-bench.jsonl). Build first:
#   cargo build --release -p shardcast -p shardcast-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:?usage: loadtest/bench.sh SCENARIO [flags...]}
shift
results=${RESULTS:-/tmp/shardcast-bench.jsonl}

# shellcheck disable=SC2086 # NODE_FLAGS is a list of flags
read -r pid port api < <(loadtest/run-node.sh ${NODE_FLAGS:---shards 2})
if [ -z "${port:-}" ]; then
  echo "bench.sh: the node did not report its port" >&2
  kill "$pid" 2>/dev/null || true
  exit 1
fi
stop_node() {
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "bench.sh: node $pid still running after 20 s; SIGKILL" >&2
  kill -9 "$pid" 2>/dev/null || true
}
trap stop_node EXIT

out=$(mktemp /tmp/shardcast-bench-out.XXXXXX)
target/release/shardcast-loadtest "$scenario" --url "ws://127.0.0.1:$port/ws" --pid "$pid" \
  --api "127.0.0.1:$api" "$@" | tee "$out"
tail -n 1 "$out" >>"$results"
rm -f "$out"
