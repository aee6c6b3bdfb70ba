#!/usr/bin/env bash
# A whole Flower federation on this machine, on loopback: one SuperLink, one SuperNode per client
# of a fedoap config, `flwr run`, Flower's own run status, then every service stopped by PID.
# Try it here before involving other hospitals; docs/flower.md maps each step to a real site.
#
#   scripts/flower_loopback.sh configs/quickstart.yaml runs/loopback          # plain HTTP
#   scripts/flower_loopback.sh configs/quickstart.yaml runs/loopback-tls --tls  # TLS + node auth
#
# FEDOAP_SUPERLINK_PORT sets the SuperLink's port (9092); FEDOAP_SITE_THREADS the PyTorch threads
# of each site (default: this machine's cores shared equally). Logs: RUN_DIR/flower/logs; Flower's
# run entry: RUN_DIR/flower/run.json. Needs: pip install -e '.[flower]' (flwr 1.42.0).
# The steps live in one place, tests/flower_helpers.py, which the deployment tests use as well.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m tests.flower_helpers "$@"
