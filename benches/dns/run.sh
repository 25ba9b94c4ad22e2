#!/usr/bin/env bash
# dnsperf on loopback: edgepop's DNS sidecar (one UDP worker, on io_uring, and again on
# recvmmsg) vs gdnsd (one UDP thread) and tinydns, same query file (90% A for the geo name,
# 10% NXDOMAIN), with and without ECS, same map; at 40k qps also as one steady stream. Reports queries/s, server CPU per query at a fixed 40k qps and at the generator's cap,
# latency, RSS idle and with 100,000 networks, and edgepop's map rebuild time (SIGHUP ->
# new answers) with 100,000 networks.
#
# "edgepop coalesce" rows: io_uring with [dns] udp_coalesce = $COALESCE (default 300us), which
# trades latency for fewer wake-ups; the summary gives each row's median latency beside its CPU.
#
# The "floor" rows are benches/dns/floor.c, a server that does no DNS work (it echoes each
# query): what the kernel charges any server for the same load. The summary gives each
# server's CPU per query above it, the part a server's own code controls.
#
# usage: benches/dns/run.sh [SECONDS_PER_RUN] [REPEATS]   (needs dnsperf, gdnsd, tinydns, dig, cc)
#        PAIRED=ROUNDS benches/dns/run.sh [SECONDS_PER_RUN]
# PAIRED: only the 40k-qps, 20-client comparison, ROUNDS times, each round running every
# server once in turn, CPU from each thread's schedstat (nanoseconds, not clock ticks); prints
# every round, the means, and in how many rounds edgepop used less than gdnsd.
# Runs alternate between servers and each configuration is repeated (default 3); the
# summary gives the median CPU per query, which is what survives a noisy shared machine.
# Everything runs on 127.0.0.1; tinydns can only use port 53 (it must be free).
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
REPEATS=${2:-3}
WORK=$(mktemp -d /tmp/edgepop-dnsbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ECS_OPT="8:00011800c63364"          # family 1, source /24, scope 0, 198.51.100.0
COOKIE_OPT="10:2464c4abcf10c957"    # a client cookie, as resolvers send (both servers answer it)
HZ=$(getconf CLK_TCK)
CLIENTS="-c 20 -T 2"   # dnsperf's clients and threads; "1 stream" rows use one of each

cargo build --release --quiet
BIN=target/release/edgepop
cc -O2 -o "$WORK/floor" benches/dns/floor.c

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
wait_port() { # wait until dig gets an answer from 127.0.0.1:$1
  for _ in $(seq 1 300); do
    dig @127.0.0.1 -p "$1" +time=1 +tries=1 +short www.edgepop.test A >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 did not come up" >&2; return 1
}

# run NAME PID PORT QPS(0 = cap) EXTRA-dnsperf-args...
run() {
  local name=$1 pid=$2 port=$3 qps=$4; shift 4
  local limit=() ; [ "$qps" != 0 ] && limit=(-Q "$qps")
  local before after out
  before=$(cpu_ticks "$pid")
  out=$(dnsperf -s 127.0.0.1 -p "$port" -d "$WORK/map/queries.txt" -l "$SECS" $CLIENTS \
        "${limit[@]}" "$@" 2>&1)
  after=$(cpu_ticks "$pid")
  local done qps_got lat
  done=$(echo "$out" | awk '/Queries completed:/ {print $3}')
  qps_got=$(echo "$out" | awk '/Queries per second:/ {print $4}')
  lat=$(echo "$out" | awk '/Average Latency/ {print $4 * 1e6 " us (max " $8 * 1e6 " us)"}' | tr -d ',)(')
  local lat_us; lat_us=$(echo "$out" | awk '/Average Latency/ {printf "%.0f", $4 * 1e6}')
  local cpu_us
  cpu_us=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$done" 'BEGIN { if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "n/a" }')
  local lost
  lost=$(echo "$out" | awk '/Queries lost:/ {print $3}')
  local load; load=$( [ "$qps" = 0 ] && echo cap || echo "$qps")
  printf '%-30s %-6s qps=%-12s cpu/query=%-6s us  latency=%s  lost=%s\n' \
    "$name" "$load" "$qps_got" "$cpu_us" "$lat" "$lost"
  echo "$name|$load|$cpu_us|$qps_got|${lat_us:-nan}" >> "$WORK/results"
}

summary() {
  echo
  echo "== median of $REPEATS runs =="
  python3 - "$WORK/results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, load, cpu, qps, lat = line.strip().split("|")
    rows.setdefault((load, name), []).append((float(cpu), float(qps), float(lat)))
def median_cpu(load, name):
    v = rows.get((load, name))
    return statistics.median(c for c, _, _ in v) if v else None
for (load, name), v in sorted(rows.items(), key=lambda kv: (kv[0][0] != "cap", kv[0][0], kv[0][1])):
    cpu = statistics.median(c for c, _, _ in v)
    qps = statistics.median(q for _, q, _ in v)
    lats = [l for _, _, l in v if l == l]  # a run without a latency line reads nan
    lat = statistics.median(lats) if lats else float("nan")
    floor = median_cpu(load, "floor 1 stream" if name.endswith("1 stream") else "floor")
    above = f"  above floor {cpu - floor:5.2f} us" if floor is not None and not name.startswith("floor") else ""
    print(f"{name:30s} {load:6s} cpu/query median {cpu:5.2f} us{above}  (runs: {', '.join(f'{c:.2f}' for c, _, _ in v)})  qps median {qps:,.0f}  latency median {lat:.0f} us")
PY
}

echo "== map: 1,000 networks (throughput runs) =="
python3 benches/dns/gen.py "$WORK/map" 1000

# --- edgepop
EP_PORT=5391
cat > "$WORK/edgepop.toml" <<EOF
[pop]
name = "bench"
[dns]
listen = "127.0.0.1:$EP_PORT"
zone = "edgepop.test"
names = ["www.edgepop.test"]
ttl = "60s"
regions = "$WORK/map/regions.toml"
udp_workers = 1
glue = { "ns1.edgepop.test" = ["192.0.2.53"] }
EOF
EDGEPOP_LOG=warn $BIN dns --config "$WORK/edgepop.toml" &
EP=$!; PIDS+=("$EP")
wait_port $EP_PORT
echo "edgepop RSS idle (1k nets): $(rss_kib $EP) KiB"
# start_variant FILE PORT LINE: the same edgepop on PORT with LINE added to [dns]; sets VARIANT.
start_variant() {
  sed -e "s/:$EP_PORT\"/:$2\"/" -e "s/^udp_workers = 1\$/udp_workers = 1\n$3/" \
    "$WORK/edgepop.toml" > "$WORK/$1"
  EDGEPOP_LOG=warn $BIN dns --config "$WORK/$1" &
  VARIANT=$!; PIDS+=("$VARIANT")
  wait_port "$2"
}
# The same with the UDP worker on recvmmsg/sendmmsg instead of io_uring ([dns] udp_io).
EP2_PORT=5393
start_variant edgepop-mmsg.toml $EP2_PORT 'udp_io = "recvmmsg"'; EP2=$VARIANT
# And on io_uring with [dns] udp_coalesce: the worker may wait up to $COALESCE after
# answering for more queries (fewer wake-ups, more latency; adaptive, see the README).
COALESCE=${COALESCE:-300us}
EP3_PORT=5395
start_variant edgepop-coalesce.toml $EP3_PORT "udp_coalesce = \"$COALESCE\""; EP3=$VARIANT

# --- gdnsd
GD_PORT=5392
GD="$WORK/map/gdnsd"
cat > "$GD/config" <<EOF
options => {
  listen => [ 127.0.0.1:$GD_PORT ]
  udp_threads => 1
  tcp_threads => 1
  run_dir => $WORK/gdnsd-run
  state_dir => $WORK/gdnsd-state
}
plugins => { geoip => {
  maps => { m => { datacenters => [pop0, pop1, pop2, pop3], nets => nets } }
  resources => { www => { map => m, dcmap => {
    pop0 => 192.0.2.1, pop1 => 192.0.2.2, pop2 => 192.0.2.3, pop3 => 192.0.2.4 } } }
} }
EOF
cat > "$GD/zones/edgepop.test" <<'EOF'
@    60 SOA ns1 hostmaster 1 3600 600 86400 60
@    60 NS  ns1
ns1  60 A   192.0.2.53
www  60 DYNA geoip!www
EOF
gdnsd -c "$GD" start 2>"$WORK/gdnsd.log" &
GDP=$!; PIDS+=("$GDP")
wait_port $GD_PORT
echo "gdnsd   RSS idle (1k nets): $(rss_kib $GDP) KiB"

# --- tinydns (port 53 only)
TD=""
if command -v tinydns >/dev/null && ! ss -lun | grep -q '127.0.0.1:53 '; then
  mkdir -p "$WORK/tinydns"
  cp "$WORK/map/tinydns-data" "$WORK/tinydns/data"
  (cd "$WORK/tinydns" && tinydns-data)
  env ROOT="$WORK/tinydns" IP=127.0.0.1 UID=65534 GID=65534 tinydns >/dev/null 2>&1 &
  TD=$!; PIDS+=("$TD")
  wait_port 53 && echo "tinydns RSS idle (1k nets): $(rss_kib $TD) KiB"
fi

# --- the floor: no DNS work at all
FL_PORT=5394
"$WORK/floor" $FL_PORT &
FL=$!; PIDS+=("$FL")
wait_port $FL_PORT

# paired_round: one 40k-qps run on each server in turn; prints its CPU per query, in µs.
cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{t += $1} END {printf "%.0f", t}'; }  # not %d: mawk clamps it at 2^31
paired_round() {
  local line=""
  for v in "edgepop $EP $EP_PORT" "edgepop(recvmmsg) $EP2 $EP2_PORT" "gdnsd $GDP $GD_PORT" "floor $FL $FL_PORT" "edgepop(coalesce) $EP3 $EP3_PORT"; do
    set -- $v
    local t0 t1 out n
    t0=$(cpu_ns "$2")
    out=$(dnsperf -s 127.0.0.1 -p "$3" -d "$WORK/map/queries.txt" -l "$SECS" $CLIENTS -Q 40000 -e 2>&1)
    t1=$(cpu_ns "$2")
    n=$(echo "$out" | awk '/Queries completed:/ {print $3}')
    line+="$1 $(awk -v t=$((t1 - t0)) -v n="$n" 'BEGIN { printf "%.3f", t / n / 1000 }') "
  done
  echo "$line"
}
if [ -n "${PAIRED:-}" ]; then
  echo
  echo "== paired: $PAIRED rounds of ${SECS}s at 40k qps, 20 clients, 2 threads (µs of CPU per query) =="
  for r in $(seq 1 "$PAIRED"); do paired_round | tee -a "$WORK/paired"; done
  awk '{ for (i = 1; i < NF; i += 2) { s[$i] += $(i + 1); n[$i]++ }
         if ($2 < $6) less++
         if ($10 < $6) less_c++ }
       END { for (k in s) printf "mean %-18s %.3f us\n", k, s[k] / n[k]
             printf "edgepop below gdnsd in %d of %d rounds; with udp_coalesce in %d\n", less, NR, less_c }' "$WORK/paired"
  exit 0
fi

echo
echo "== dnsperf, ${SECS}s per run, 20 clients, 2 threads =="
for _ in $(seq 1 "$REPEATS"); do
  for target in 40000 0; do
    run "edgepop" $EP $EP_PORT $target -e
    run "gdnsd" $GDP $GD_PORT $target -e
    run "edgepop (recvmmsg)" $EP2 $EP2_PORT $target -e
    run "floor" $FL $FL_PORT $target -e
    run "edgepop coalesce $COALESCE" $EP3 $EP3_PORT $target -e
    if [ "$target" != 0 ]; then
      # The same rate as one steady stream (a query every 25 us, each waking the server):
      # closer to many independent resolvers than 20 clients' bursts of about 4 queries.
      CLIENTS="-c 1 -T 1"
      run "edgepop 1 stream" $EP $EP_PORT $target -e
      run "gdnsd 1 stream" $GDP $GD_PORT $target -e
      run "edgepop (recvmmsg) 1 stream" $EP2 $EP2_PORT $target -e
      run "floor 1 stream" $FL $FL_PORT $target -e
      run "edgepop coalesce $COALESCE 1 stream" $EP3 $EP3_PORT $target -e
      CLIENTS="-c 20 -T 2"
    fi
    run "edgepop +ECS" $EP $EP_PORT $target -E "$ECS_OPT"
    run "gdnsd +ECS" $GDP $GD_PORT $target -E "$ECS_OPT"
    run "edgepop +cookie" $EP $EP_PORT $target -E "$COOKIE_OPT"
    run "gdnsd +cookie" $GDP $GD_PORT $target -E "$COOKIE_OPT"
    if [ -n "$TD" ]; then run "tinydns (no EDNS)" $TD 53 $target; fi
  done
done
summary

kill $EP $EP2 $EP3 $GDP $FL ${TD:-} 2>/dev/null || true
wait 2>/dev/null || true

echo
echo "== 100,000 networks: RSS and rebuild =="
python3 benches/dns/gen.py "$WORK/big" 100000
sed -i "s#$WORK/map/regions.toml#$WORK/big/regions.toml#" "$WORK/edgepop.toml"
EDGEPOP_LOG=warn $BIN dns --config "$WORK/edgepop.toml" &
EP=$!; PIDS+=("$EP")
wait_port $EP_PORT
echo "edgepop RSS with 100k nets: $(rss_kib $EP) KiB"
# Move 198.51.100.0/24 from r0 (pop0) to a region of its own answered by pop3, then SIGHUP.
before=$(dig @127.0.0.1 -p $EP_PORT +short +subnet=198.51.100.0/24 www.edgepop.test A)
python3 - "$WORK/big/regions.toml" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read().replace('  "198.51.100.0/24",\n', '', 1)
s = s.replace('[default]', '[[regions]]\nname = "moved"\npops = ["pop3"]\nnetworks = ["198.51.100.0/24"]\n\n[default]')
open(p, "w").write(s)
EOF
t0=$(date +%s%N)
kill -HUP $EP
while :; do
  now=$(dig @127.0.0.1 -p $EP_PORT +short +time=1 +tries=1 +subnet=198.51.100.0/24 www.edgepop.test A)
  [ "$now" != "$before" ] && break
  [ $(( $(date +%s%N) - t0 )) -gt 30000000000 ] && { echo "no change after 30s"; break; }
done
t1=$(date +%s%N)
echo "edgepop rebuild, SIGHUP -> new answer with 100k nets: $(( (t1 - t0) / 1000000 )) ms ($before -> $now)"
echo "edgepop RSS after rebuild: $(rss_kib $EP) KiB"

GD="$WORK/big/gdnsd"
cp "$WORK/map/gdnsd/config" "$GD/config"
sed -i "s#$WORK/gdnsd-#$WORK/gdnsd-big-#" "$GD/config"
cp "$WORK/map/gdnsd/zones/edgepop.test" "$GD/zones/"
gdnsd -c "$GD" start 2>"$WORK/gdnsd-big.log" &
GDP=$!; PIDS+=("$GDP")
wait_port $GD_PORT
echo "gdnsd   RSS with 100k nets: $(rss_kib $GDP) KiB"
