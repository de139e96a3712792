#!/usr/bin/env bash
# Cross-node direct messages through Redis (one redis-server, or with REDIS_PRIMARIES=N an
# N-primary Redis Cluster): users are connected to node B only, every
# message is published through node A's API, so each one crosses Redis. Reports the p2p
# figures (delivered, lost, latency) and, from Redis INFO, the commands, bytes and CPU the
# run cost Redis per message.
#
#   loadtest/cross-node.sh [p2p flags...]
#   e.g. loadtest/cross-node.sh --users 2000 --msgs 50000 --rate 5000
#        REDIS_PRIMARIES=3 loadtest/cross-node.sh --users 1000 --msgs 100000 --rate 10000
#
# Starts redis-server and two release dev nodes (1 shard each, unpinned) on free loopback
# ports and stops them all by pid at the end. Build first:
#   cargo build --release -p shardcast -p shardcast-loadtest
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# REDIS_PRIMARIES=N: an N-primary Redis Cluster (no replicas) instead of one redis-server.
primaries=${REDIS_PRIMARIES:-0}
redis_ports=()
bus_ports=()
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "${cluster_dir:-}"; }
trap cleanup EXIT
for _ in $(seq "$(( primaries > 0 ? primaries : 1 ))"); do
  port=$(free_port)
  extra=()
  if (( primaries > 0 )); then
    cluster_dir=${cluster_dir:-$(mktemp -d)}
    mkdir -p "$cluster_dir/$port"
    bus_ports+=("$(free_port)")
    extra=(--cluster-enabled yes --cluster-config-file "$cluster_dir/$port/nodes.conf"
      --cluster-port "${bus_ports[-1]}" --dir "$cluster_dir/$port")
  fi
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no "${extra[@]}" >/dev/null 2>&1 &
  pids+=("$!")
  redis_ports+=("$port")
  for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
done
redis_port=${redis_ports[0]}
redis_url="redis://127.0.0.1:$redis_port"
if (( primaries > 0 )); then
  per=$(( 16384 / primaries ))
  for i in "${!redis_ports[@]}"; do
    first=$(( i * per )); last=$(( i + 1 == primaries ? 16383 : (i + 1) * per - 1 ))
    redis-cli -p "${redis_ports[$i]}" cluster addslotsrange "$first" "$last" >/dev/null
    redis-cli -p "${redis_ports[$i]}" cluster set-config-epoch "$(( i + 1 ))" >/dev/null
    # The bus port is not port + 10000 here: MEET must name it.
    redis-cli -p "${redis_ports[$i]}" cluster meet 127.0.0.1 "$redis_port" "${bus_ports[0]}" >/dev/null
  done
  for _ in $(seq 100); do
    ok=1
    for port in "${redis_ports[@]}"; do
      [[ $(redis-cli -p "$port" cluster info) == *cluster_state:ok* ]] || ok=0
      (( $(redis-cli -p "$port" cluster nodes | wc -l) == primaries )) || ok=0
    done
    (( ok )) && break
    sleep 0.2
  done
  redis_url="redis+cluster://$(printf '127.0.0.1:%s,' "${redis_ports[@]}" | sed 's/,$//')"
fi

export SHARDCAST_PIN_SHARDS=false
read -r pid_a _port_a api_a < <(loadtest/run-node.sh --shards 1 --node-id bench-a --redis "$redis_url")
pids+=("$pid_a")
read -r pid_b port_b _api_b < <(loadtest/run-node.sh --shards 1 --node-id bench-b --redis "$redis_url")
pids+=("$pid_b")
sleep 1

info() { for port in "${redis_ports[@]}"; do redis-cli -p "$port" info "$1"; done; }
sum() { awk -F: -v f="$1" '$1 == f {s += $2} END {printf "%.3f", s}'; }
cpu() { info cpu | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.3f", s}'; }
calls() { info stats | sum total_commands_processed; }
net_in() { info stats | sum total_net_input_bytes; }
net_out() { info stats | sum total_net_output_bytes; }

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
print(f"redis per message: {(float(c1) - float(c0)) / m:.2f} commands, "
      f"{(float(i1) - float(i0)) / m:.0f} bytes in, {(float(o1) - float(o0)) / m:.0f} bytes out; "
      f"CPU per 100k messages: {(float(cpu1) - float(cpu0)) / m * 100_000:.2f} s")
EOF
