# Shared by benches/edge/run.sh and benches/edge/h3.sh (sourced from the repository root):
# checks the tools, builds the release binary, picks free loopback ports, fills the config
# templates (@...@ placeholders) and kills what it started on exit.
command -v nginx >/dev/null && command -v h2load >/dev/null || {
  echo "needs nginx and h2load (apt-get install -y nginx-light nghttp2-client)"; exit 1; }
cargo build --release -q
BIN=$PWD/target/release/edgepop
DIR=$(mktemp -d); CERTS=$PWD/certs
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ORIGIN_PORT=$(free_port); NGINX_EDGE_PORT=$(free_port); EDGE_PORT=$(free_port); ADMIN_PORT=$(free_port)
HAPROXY_EDGE_PORT=$(free_port); H2O_EDGE_PORT=$(free_port)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
# fill TEMPLATE PROTOCOL WARM (EARLY from the environment, default false; UPSTREAM_ALPN for HAProxy)
fill() { sed -e "s#@DIR@#$DIR#g; s#@CERTS@#$CERTS#g; s#@ORIGIN_PORT@#$ORIGIN_PORT#g; s#@NGINX_EDGE_PORT@#$NGINX_EDGE_PORT#g; s#@EDGE_PORT@#$EDGE_PORT#g; s#@ADMIN_PORT@#$ADMIN_PORT#g; s#@PROTOCOL@#$2#g; s#@WARM@#$3#g; s#@EARLY@#${EARLY:-false}#g; s#@HAPROXY_EDGE_PORT@#$HAPROXY_EDGE_PORT#g; s#@H2O_EDGE_PORT@#$H2O_EDGE_PORT#g; s#@UPSTREAM_ALPN@#${UPSTREAM_ALPN:-h2}#g" "$1"; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up"; exit 1; }
