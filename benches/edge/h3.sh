#!/usr/bin/env bash
# HTTP/3 clients against edgepop (one worker, http1 upstream to an nginx origin), next to h2
# and http/1.1 clients of the same edgepop in the same run: requests/s and the edge's CPU per
# request. The HTTP/3 load comes from benches/h3_load.rs (no packaged tool speaks HTTP/3); it
# runs 16 connections x 32 streams like the h2 run (h2load -c 16 -m 32).
#   bash benches/edge/h3.sh      (needs nginx, h2load: apt-get install nginx-light nghttp2-client)
# Env: N (requests per run, default 100000), ROUNDS (alternations, default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-100000}; ROUNDS=${ROUNDS:-2}; EARLY=false
. benches/edge/common.sh
cargo build --release -q --bench h3_load
LOAD=$(ls -t target/release/deps/h3_load-* | grep -v '\.d$' | head -1)

fill benches/edge/nginx-origin.conf.in x x > "$DIR/origin.conf"
nginx -c "$DIR/origin.conf" -p "$DIR" & pids+=($!)
wait_port "$ORIGIN_PORT"
fill benches/edge/edgepop.toml.in http1 16 \
  | sed -e "s#^address = \"127.0.0.1:$EDGE_PORT\"#&\nhttp3 = true#" > "$DIR/edgepop.toml"
grep -q '^http3 = true' "$DIR/edgepop.toml"
TOKIO_WORKER_THREADS=1 EDGEPOP_LOG=warn "$BIN" serve --config "$DIR/edgepop.toml" > /dev/null & EDGE_PID=$!
pids+=($EDGE_PID); wait_port "$EDGE_PORT"
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$EDGE_PID/stat"; }
run() { # label command...
  local label=$1; shift
  "$@" > /dev/null 2>&1 || true   # warm-up uses the same command; N is small enough to repeat
  local before after out
  before=$(cpu_ticks)
  out=$("$@" 2>&1)
  after=$(cpu_ticks)
  local rps
  rps=$(echo "$out" | awk '/^finished in/ {gsub(",", "", $4); print $4}')
  printf "%-34s %10s req/s   edge CPU %5s us/req\n" "$label" "$rps" \
    "$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$N" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')"
}
echo "edgepop, one worker, http/1.1 upstream to nginx; $N requests per run, $(nproc) cores"
for _ in $(seq "$ROUNDS"); do
  run "client HTTP/3 (16 conns x 32)" "$LOAD" "$EDGE_PORT" "$N" 16 32
  run "client h2 (h2load -c 16 -m 32)" h2load -c 16 -m 32 -n "$N" "https://localhost:$EDGE_PORT/"
  run "client http/1.1 (h2load --h1 -c 16)" h2load --h1 -c 16 -n "$N" "https://localhost:$EDGE_PORT/"
done
