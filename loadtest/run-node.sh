#!/usr/bin/env bash
# Starts a release dev node for benchmarks on free loopback ports and prints
# "PID PORT API_PORT". Usage: loadtest/run-node.sh [serve flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp /tmp/shardcast-bench.XXXXXX)
target/release/shardcast serve --dev --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 "$@" >"$log" 2>&1 &
pid=$!
port="" api=""
for _ in $(seq 50); do
  port=$(grep -o ' listen=127.0.0.1:[0-9]*' "$log" | cut -d: -f2 || true)
  api=$(grep -o ' api_listen=127.0.0.1:[0-9]*' "$log" | cut -d: -f2 || true)
  [ -n "$port" ] && break
  sleep 0.1
done
echo "$pid $port $api"
