#!/usr/bin/env bash
# Cross-node direct messages through one Redis: users are connected to node B only, every
# message is published through node A's API, so each one crosses Redis. Reports the p2p
# figures (delivered, lost, latency) and, from Redis INFO, the commands, bytes and CPU the
# run cost Redis per message.
#
#   loadtest/cross-node.sh [p2p flags...]
#   e.g. loadtest/cross-node.sh --users 2000 --msgs 50000 --rate 5000
#
# Starts redis-server and two release dev nodes (1 shard each, unpinned) on free loopback
# ports and stops them all by pid at the end. Build first:
#   cargo build --release -p shardcast -p shardcast-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
redis_pid=$!
pids=("$redis_pid")
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

export SHARDCAST_PIN_SHARDS=false
read -r pid_a _port_a api_a < <(loadtest/run-node.sh --shards 1 --node-id bench-a --redis "redis://127.0.0.1:$redis_port")
pids+=("$pid_a")
read -r pid_b port_b _api_b < <(loadtest/run-node.sh --shards 1 --node-id bench-b --redis "redis://127.0.0.1:$redis_port")
pids+=("$pid_b")
sleep 1

info() { redis-cli -p "$redis_port" info "$1"; }
field() { grep "^$1:" | cut -d: -f2 | tr -d '\r'; }
cpu() { info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }
calls() { info stats | field total_commands_processed; }
net_in() { info stats | field total_net_input_bytes; }
net_out() { info stats | field total_net_output_bytes; }

cpu0=$(cpu) calls0=$(calls) in0=$(net_in) out0=$(net_out)
out=$(target/release/shardcast-loadtest p2p --url "ws://127.0.0.1:$port_b/ws" \
  --api "127.0.0.1:$api_a" --pid "$pid_a,$pid_b" "$@")
cpu1=$(cpu) calls1=$(calls) in1=$(net_in) out1=$(net_out)
echo "$out"

messages=$(echo "$out" | tail -n 1 | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["direct"]["sent"])')
python3 - "$messages" "$cpu0" "$cpu1" "$calls0" "$calls1" "$in0" "$in1" "$out0" "$out1" <<'EOF'
import sys
m, cpu0, cpu1, c0, c1, i0, i1, o0, o1 = sys.argv[1:]
m = max(int(m), 1)
print(f"redis per message: {(int(c1) - int(c0)) / m:.2f} commands, "
      f"{(int(i1) - int(i0)) / m:.0f} bytes in, {(int(o1) - int(o0)) / m:.0f} bytes out; "
      f"CPU per 100k messages: {(float(cpu1) - float(cpu0)) / m * 100_000:.2f} s")
EOF
