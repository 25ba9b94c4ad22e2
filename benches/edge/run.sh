#!/usr/bin/env bash
# End-to-end throughput: h2load through edgepop vs through nginx, HAProxy and h2o (each
# reusing its upstream connections), all in front of the same nginx origin, one worker or
# thread each, on loopback, in one run.
#   bash benches/edge/run.sh   (needs nginx, h2load; HAProxy and h2o rows when installed:
#                               apt-get install nginx-light nghttp2-client haproxy h2o)
# Env: N (requests per run, default 200000), C (clients, 16), M (h2 streams per client, 32),
# ROUNDS (default 1; each round measures every row once, rounds alternate between the proxies
# and the ratios use each row's median, which is what survives a noisy shared machine),
# EARLY=true (edgepop with [pop] early_data: every client connection then runs on edgepop's
# own 0-RTT-capable server TLS stream instead of tokio-rustls').
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-200000}; C=${C:-16}; M=${M:-32}; ROUNDS=${ROUNDS:-1}
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
  # 2xx answers (a fast error is no result) and completed requests: h2load reads no status from
  # an http/1.1 status line without a reason phrase, which HAProxy sends for h2 upstream answers.
  ok=$(awk '/^status codes:/ {print $3}' "$DIR/$key.out")
  done_=$(awk '/^requests:/ {print $6}' "$DIR/$key.out")
  cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$N" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
  printf "%-48s %10s req/s   p99 %7s ms   proxy CPU %5s us/req   (%s of %s)\n" \
    "$1" "$rps" "$(p99 "$log")" "$cpu" "${done_:-0} done, ${ok:-0} 2xx" "$N"
  echo "$rps" >> "$DIR/$key.rps"
  echo "$cpu" >> "$DIR/$key.cpu"
}
edge() { # protocol
  fill benches/edge/edgepop.toml.in "$1" 16 > "$DIR/edgepop-$1.toml"
  TOKIO_WORKER_THREADS=1 EDGEPOP_LOG=warn "$BIN" serve --config "$DIR/edgepop-$1.toml" > /dev/null & EDGE_PID=$!
  pids+=($EDGE_PID); wait_port "$EDGE_PORT"
}
stop_edge() { kill "$EDGE_PID"; wait "$EDGE_PID" 2>/dev/null || true; }

echo "h2load -n $N -c $C (-m $M for h2), one worker per proxy, origin: nginx (1 worker), $(nproc) cores, edgepop early_data=${EARLY:-false}"
for round in $(seq "$ROUNDS"); do
  [ "$ROUNDS" -gt 1 ] && echo "-- round $round of $ROUNDS"
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

  # HAProxy (one thread, http-reuse always), upstream h2 and http/1.1 like edgepop.
  if command -v haproxy >/dev/null; then
    cat "$CERTS/edge.crt" "$CERTS/edge.key" > "$DIR/edge.pem"
    for alpn in h2 http/1.1; do
      UPSTREAM_ALPN=$alpn fill benches/edge/haproxy-edge.cfg.in x x > "$DIR/haproxy.cfg"
      haproxy -db -f "$DIR/haproxy.cfg" > "$DIR/haproxy.log" 2>&1 & HAP=$!; pids+=($HAP)
      wait_port "$HAPROXY_EDGE_PORT"
      up=${alpn/\/1.1/1}
      run "haproxy (upstream $up), client h2" "$HAPROXY_EDGE_PORT" h2 "$HAP"
      run "haproxy (upstream $up), client h1" "$HAPROXY_EDGE_PORT" h1 "$HAP"
      kill "$HAP"; wait "$HAP" 2>/dev/null || true
    done
  else
    echo "haproxy not installed: no HAProxy rows (apt-get install haproxy)"
  fi

  # h2o (one thread; h2o 2.2 keeps http/1.1 connections to the origin).
  if command -v h2o >/dev/null; then
    fill benches/edge/h2o-edge.conf.in x x > "$DIR/h2o.conf"
    # h2o started as root switches to nobody unless told otherwise (nobody cannot write in $DIR).
    [ "$(id -u)" = 0 ] && echo "user: root" >> "$DIR/h2o.conf"
    h2o -c "$DIR/h2o.conf" > "$DIR/h2o.log" 2>&1 & H2O=$!; pids+=($H2O)
    wait_port "$H2O_EDGE_PORT"
    run "h2o (upstream http/1.1 keepalive), client h2" "$H2O_EDGE_PORT" h2 "$H2O"
    run "h2o (upstream http/1.1 keepalive), client h1" "$H2O_EDGE_PORT" h1 "$H2O"
    kill "$H2O"; wait "$H2O" 2>/dev/null || true
  else
    echo "h2o not installed: no h2o rows (apt-get install h2o)"
  fi
done

median() { python3 -c 'import sys, statistics; print(statistics.median(float(l) for l in open(sys.argv[1]) if l.strip()))' "$1"; }
ratio() { # label-a label-b rps|cpu: the ratio of the two rows' medians
  local a b; a=$(printf %s "$1" | tr -c 'a-zA-Z0-9' '_'); b=$(printf %s "$2" | tr -c 'a-zA-Z0-9' '_')
  [ -s "$DIR/$a.$3" ] && [ -s "$DIR/$b.$3" ] || { echo "-"; return; }
  python3 -c "print(f'{$(median "$DIR/$a.$3") / $(median "$DIR/$b.$3"):.2f}')"
}
if [ "$ROUNDS" -gt 1 ]; then
  echo
  echo "medians of $ROUNDS rounds:"
  for f in "$DIR"/*.rps; do
    k=$(basename "$f" .rps)
    printf "  %-48s %10.0f req/s   proxy CPU %5.1f us/req   (CPU per round: %s)\n" "$k" \
      "$(median "$f")" "$(median "$DIR/$k.cpu")" "$(tr '\n' ' ' < "$DIR/$k.cpu")"
  done
fi
compare() { # edgepop-label peer-label
  printf "  %-48s vs %-48s req/s %5sx   CPU per request %5sx\n" "$1" "$2" "$(ratio "$1" "$2" rps)" "$(ratio "$1" "$2" cpu)"
}
echo
echo "ratios (edgepop / peer; req/s above 1 and CPU below 1 favour edgepop):"
for c in h2 h1; do
  compare "edgepop (upstream h2), client $c" "nginx (upstream http/1.1 keepalive), client $c"
  compare "edgepop (upstream http1), client $c" "nginx (upstream http/1.1 keepalive), client $c"
  compare "edgepop (upstream h2), client $c" "haproxy (upstream h2), client $c"
  compare "edgepop (upstream http1), client $c" "haproxy (upstream http1), client $c"
  compare "edgepop (upstream http1), client $c" "h2o (upstream http/1.1 keepalive), client $c"
done
