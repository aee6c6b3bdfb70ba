#!/usr/bin/env bash
# Import time of the ClientApp path Flower pays per message: median of 5 fresh processes, for an
# older release (commit f96a2a6) and this code. Run it on an idle machine.
#   bash benchmarks/flower/import_time.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
old=$(mktemp -d)/old
git worktree add -f "$old" f96a2a6 > /dev/null
trap 'git worktree remove --force "$old"' EXIT
med() { for _ in 1 2 3 4 5; do PYTHONPATH=$1 python -c "import time; t = time.perf_counter(); import $2; print(time.perf_counter() - t)"; done | sort -n | sed -n 3p; }
echo "| module | seconds |"
echo "|---|---|"
echo "| fedoap.federation.flower at f96a2a6 (before) | $(med "$old/src" fedoap.federation.flower) |"
echo "| fedoap.federation.flower_site now (simulation, worker=false) | $(med "$PWD/src" fedoap.federation.flower_site) |"
echo "| fedoap.federation.flower_client now (deployment relay) | $(med "$PWD/src" fedoap.federation.flower_client) |"
echo "| flwr.supernode.cli (Flower's own flwr-clientapp) | $(med "$PWD/src" flwr.supernode.cli) |"
echo "| torch | $(med "$PWD/src" torch) |"
