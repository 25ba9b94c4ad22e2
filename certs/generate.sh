#!/usr/bin/env bash
# Regenerates the DEVELOPMENT certificates in this folder (never use them in production):
#   dev-ca.crt/.key   a throw-away CA
#   edge.crt/.key     leaf for localhost, *.edgepop.test, edgepop.test, 127.0.0.1, ::1 (the edge)
#   origin.crt/.key   leaf for origin.edgepop.test, localhost, 127.0.0.1 (test/demo origins)
# Needs only openssl. Usage: bash certs/generate.sh
set -euo pipefail
cd "$(dirname "$0")"
days=3650
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
  -subj "/CN=edgepop development CA" -keyout dev-ca.key -out dev-ca.crt \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
leaf() {
  local name=$1 cn=$2 san=$3
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$cn" \
    -keyout "$name.key.tmp" -out "$name.csr" 2>/dev/null
  openssl pkcs8 -topk8 -nocrypt -in "$name.key.tmp" -out "$name.key"
  rm -f "$name.key.tmp"
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' "$san" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA dev-ca.crt -CAkey dev-ca.key -CAcreateserial \
    -days "$days" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
leaf edge localhost "DNS:localhost,DNS:*.edgepop.test,DNS:edgepop.test,IP:127.0.0.1,IP:::1"
leaf origin origin.edgepop.test "DNS:origin.edgepop.test,DNS:localhost,IP:127.0.0.1"
rm -f dev-ca.srl
echo "development certificates written to $(pwd)"
