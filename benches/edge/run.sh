#!/usr/bin/env bash
# End-to-end throughput: h2load through edgepop vs through nginx (upstream keepalive), both
# in front of the same nginx origin, one worker each, on loopback, in one run.
#   bash benches/edge/run.sh            (needs nginx, h2load: apt-get install nginx-light nghttp2-client)
# Env: N (requests per run, default 200000), C (clients, 16), M (h2 streams per client, 32),
# EARLY=true (edgepop with [pop] early_data: every client connection then runs on edgepop's
# own 0-RTT-capable server TLS stream instead of tokio-rustls').
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-200000}; C=${C:-16}; M=${M:-32}
. benches/edge/common.sh

fill benches/edge/nginx-origin.conf.in x x > "$DIR/origin.conf"
nginx -c "$DIR/origin.conf" -p "$DIR" & pids+=($!)
fill benches/edge/nginx-edge.conf.in x x > "$DIR/edge.conf"
nginx -c "$DIR/edge.conf" -p "$DIR" & pids+=($!)
wait_port "$ORIGIN_PORT"; wait_port "$NGINX_EDGE_PORT"

# p99 from h2load's per-request log (duration in microseconds is the 3rd column).
p99() { sort -n -k3 "$1" | awk '{d[NR]=$3} END {i=int(NR*0.99); if (i<1) i=1; printf "%.2f", d[i]/1000}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
run() { # label port h1|h2 proxy-pid (its CPU per request is reported: the fairer figure when
        # h2load, the proxy and the origin share two cores)
  local key; key=$(printf %s "$1" | tr -c 'a-zA-Z0-9' '_')
  local log="$DIR/$key.log"
  local args=(-c "$C")
  if [ "$3" = h1 ]; then args+=(--h1); else args+=(-m "$M"); fi
  h2load "${args[@]}" -n 5000 "https://localhost:$2/" > /dev/null 2>&1 || true   # warm-up
  local before after
  before=$(cpu_ticks "$4")
  h2load "${args[@]}" -n "$N" --log-file="$log" "https://localhost:$2/" > "$DIR/$key.out" 2>&1 || true
  after=$(cpu_ticks "$4")
  local rps ok cpu
  rps=$(awk '/^finished in/ {print $4}' "$DIR/$key.out")
  ok=$(awk '/^requests:/ {print $8}' "$DIR/$key.out")
  cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$N" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  printf "%-48s %10s req/s   p99 %7s ms   proxy CPU %5s us/req   (%s of %s succeeded)\n" \
    "$1" "$rps" "$(p99 "$log")" "$cpu" "$ok" "$N"
  echo "$rps" > "$DIR/$key.rps"
  echo "$cpu" > "$DIR/$key.cpu"
}
edge() { # protocol
  fill benches/edge/edgepop.toml.in "$1" 16 > "$DIR/edgepop-$1.toml"
  TOKIO_WORKER_THREADS=1 EDGEPOP_LOG=warn "$BIN" serve --config "$DIR/edgepop-$1.toml" > /dev/null & EDGE_PID=$!
  pids+=($EDGE_PID); wait_port "$EDGE_PORT"
}
stop_edge() { kill "$EDGE_PID"; wait "$EDGE_PID" 2>/dev/null || true; }

echo "h2load -n $N -c $C (-m $M for h2), one worker per proxy, origin: nginx (1 worker), $(nproc) cores, edgepop early_data=${EARLY:-false}"
for proto in h2 http1; do
  edge "$proto"
  run "edgepop (upstream $proto), client h2" "$EDGE_PORT" h2 "$EDGE_PID"
  run "edgepop (upstream $proto), client h1" "$EDGE_PORT" h1 "$EDGE_PID"
  stop_edge
done
# The edge nginx's one worker (its master does no request work).
NGINX_WORKER=$(pgrep -P "$(cat "$DIR/edge.pid")" | head -1)
run "nginx (upstream http/1.1 keepalive), client h2" "$NGINX_EDGE_PORT" h2 "$NGINX_WORKER"
run "nginx (upstream http/1.1 keepalive), client h1" "$NGINX_EDGE_PORT" h1 "$NGINX_WORKER"
ratio() { # label-a label-b rps|cpu
  local a b; a=$(printf %s "$1" | tr -c 'a-zA-Z0-9' '_'); b=$(printf %s "$2" | tr -c 'a-zA-Z0-9' '_')
  python3 -c "print(f'{float(open(\"$DIR/$a.$3\").read())/float(open(\"$DIR/$b.$3\").read()):.2f}')"
}
H2E='edgepop (upstream h2), client h2'; H2N='nginx (upstream http/1.1 keepalive), client h2'
H1E='edgepop (upstream http1), client h1'; H1N='nginx (upstream http/1.1 keepalive), client h1'
echo "client h2: edgepop(h2 upstream)/nginx req/s $(ratio "$H2E" "$H2N" rps), CPU per request $(ratio "$H2E" "$H2N" cpu)"
echo "client h1: edgepop(http1 upstream)/nginx req/s $(ratio "$H1E" "$H1N" rps), CPU per request $(ratio "$H1E" "$H1N" cpu)"
