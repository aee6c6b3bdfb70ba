#!/usr/bin/env bash
# A whole Flower federation on this machine, on loopback: one SuperLink, one SuperNode per client
# of a fedoap config, `flwr run`, Flower's own run status, then every service stopped by PID.
# Try it here before involving other hospitals; docs/flower.md maps each step to a real site.
#
#   scripts/flower_loopback.sh configs/quickstart.yaml runs/loopback          # plain HTTP
#   scripts/flower_loopback.sh configs/quickstart.yaml runs/loopback-tls --tls  # TLS + node auth
#
# Needs: pip install -e '.[flower]' (flwr 1.42.0), openssl and ssh-keygen for --tls.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG RUN_DIR [--tls]}
RUN_DIR=${2:?usage: $0 CONFIG RUN_DIR [--tls]}
TLS=${3:-}

if [ -e "$RUN_DIR" ]; then echo "error: $RUN_DIR exists; choose a new run folder" >&2; exit 2; fi
mkdir -p "$RUN_DIR/flower/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
WORK=$RUN_DIR/flower

# Offline settings (docs/flower.md): no runtime dependency installation, no telemetry, a private
# FLWR_HOME for the CLI's connection profile.
export FLWR_HOME=$WORK/flwr-home FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"

# The resolved config goes where the ServerApp reads it; the client names come from it.
fedoap config -c "$CONFIG" > "$RUN_DIR/config.yaml"
mapfile -t CLIENTS < <(fedoap config -c "$CONFIG" --clients)
APP=$(python -c 'from fedoap.federation.flower_launch import APP_DIR; print(APP_DIR)')
PORT=${FEDOAP_SUPERLINK_PORT:-9092}

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -- -"$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

LINK_TLS=(--insecure) NODE_TLS=(--insecure) PROFILE_TLS='insecure = true'
if [ "$TLS" = "--tls" ]; then
  C=$WORK/certs; mkdir -p "$C"
  # A private CA and a server certificate for 127.0.0.1 (a hospital uses its own PKI here).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=fedoap loopback CA" -keyout "$C/ca.key" -out "$C/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$C/server.key" -out "$C/server.csr" 2>/dev/null
  openssl x509 -req -in "$C/server.csr" -CA "$C/ca.crt" -CAkey "$C/ca.key" -CAcreateserial \
    -days 2 -out "$C/server.pem" -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:localhost") 2>/dev/null
  LINK_TLS=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem" --ssl-keyfile "$C/server.key"
            --enable-supernode-auth)
  NODE_TLS=(--root-certificates "$C/ca.crt")
  PROFILE_TLS="root-certificates = \"$C/ca.crt\""
fi

# 1. The SuperLink (the server side of the federation).
setsid flower-superlink "${LINK_TLS[@]}" --port "$PORT" --disable-runtime-dependency-installation \
  > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)

# 2. The connection profile the `flwr` CLI uses to reach it.
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:$PORT"
$PROFILE_TLS
TOML
for _ in $(seq 60); do flwr list loopback --format json >/dev/null 2>&1 && break; sleep 1; done

# 3. One SuperNode per hospital; each sees only its own data (here: the config's own source;
#    a real site adds data-path="/its/own/data.npz" to --node-config).
#    Here every "hospital" shares this machine's cores: each site's PyTorch gets an equal share
#    (OMP_NUM_THREADS; FEDOAP_SITE_THREADS overrides it). Four sites with two threads each on two
#    cores made training ~20x slower than in-process (busy-waiting OpenMP threads).
CORES=$(python -c 'import os; print(len(os.sched_getaffinity(0)))')
export OMP_NUM_THREADS=${FEDOAP_SITE_THREADS:-$(( CORES / ${#CLIENTS[@]} > 0 ? CORES / ${#CLIENTS[@]} : 1 ))}
i=0
for name in "${CLIENTS[@]}"; do
  AUTH=()
  if [ "$TLS" = "--tls" ]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -f "$WORK/certs/$name" -C "$name"
    flwr supernode register "$WORK/certs/$name.pub" loopback --format json > /dev/null
    AUTH=(--auth-supernode-private-key "$WORK/certs/$name")
  fi
  setsid flower-supernode "${NODE_TLS[@]}" "${AUTH[@]}" --superlink "127.0.0.1:$PORT" \
    --port $((PORT + 10 + i)) --node-config "client-name=\"$name\"" \
    > "$WORK/logs/supernode-$name.log" 2>&1 &
  PIDS+=($!)
  i=$((i + 1))
done

# 4. Submit the app and wait. Success is read from Flower's run status, never from exit codes.
RUN_ID=$(flwr run "$APP" loopback --run-config "run-dir='$RUN_DIR'" --format json |
         python -c 'import json, sys; print(json.load(sys.stdin)["run-id"])')
echo "run $RUN_ID submitted to 127.0.0.1:$PORT with ${#CLIENTS[@]} SuperNodes"
while :; do
  STATUS=$(flwr list loopback --format json | python -c "
import json, sys
print(next(r['status'] for r in json.load(sys.stdin)['runs'] if str(r['run-id']) == '$RUN_ID'))")
  case $STATUS in finished:*) break ;; esac
  sleep 5
done
echo "Flower status: $STATUS"
flwr list loopback --format json | python -c "
import json, sys
run = next(r for r in json.load(sys.stdin)['runs'] if str(r['run-id']) == '$RUN_ID')
json.dump(run, open('$WORK/run.json', 'w'), indent=2)"
[ "$STATUS" = "finished:completed" ] || { echo "see $WORK/logs" >&2; exit 1; }
python -c "
import json; s = json.load(open('$RUN_DIR/summary.json'))
for n, c in s['clients'].items(): print(f\"{n:14s} test Dice {c['test']['dice']:.3f}\")
print(f\"mean           test Dice {s['mean']['test']['dice']:.3f}\")"
