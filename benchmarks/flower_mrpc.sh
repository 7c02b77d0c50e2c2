#!/usr/bin/env bash
# Wall time of a 3-node, 5-round HLoRA run on MRPC (default model) on Flower's Deployment Engine, all on
# this machine (loopback, insecure: this measures the engine, not the network). Nodes hold a 3-way IID
# partition of MRPC train with ranks 2, 4, 8. The same run in the embedded simulation:
#   hlora run --clients 3 --per-round 3 --rounds 5 --ranks 2,4,8 --partition iid --out OUT
# Usage: benchmarks/flower_mrpc.sh OUT_DIR   (needs pip install "hlora[flower]")
# ROUNDS=1 LOCAL_EPOCHS=1 benchmarks/flower_mrpc.sh OUT_DIR: a shorter run (the simulation's
# --rounds/--local-epochs to compare with). Each node trains with THREADS torch threads (default 1: three
# nodes share this machine's cores; on a site of its own a node would use its machine's).
# WORKER=true (the default, as a node's): each node keeps its model and data loaded in a node worker (the
# workers' sockets and logs in $WORK/workers); WORKER=false: every message loads them again.
set -euo pipefail
OUT=$(realpath -m "${1:?usage: $0 OUT_DIR}")
APP=$(cd "$(dirname "$0")/../flower-app" && pwd)
WORK=$(mktemp -d)
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
PORT=${PORT:-19193}
ROUNDS=${ROUNDS:-5}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-2}
printf '[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:%s"\ninsecure = true\n' \
  "$PORT" > "$FLWR_HOME/config.toml"

PIDS=()
cleanup() {  # every process group started here, then any Flower child left in a session of its own
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  for pid in $(grep -lz "FLWR_HOME=$FLWR_HOME" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

setsid flower-superlink --insecure --host 127.0.0.1 --port "$PORT" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
RANKS=(2 4 8)
for i in 0 1 2; do
  setsid flower-supernode --insecure --superlink "127.0.0.1:$PORT" --port $((PORT + 10 + i)) \
    --node-config "rank=${RANKS[$i]} partition-id=$i num-partitions=3 threads=${THREADS:-1} worker=${WORKER:-true} worker-dir=\"$WORK/workers\"" \
    > "$WORK/node$i.log" 2>&1 &
  PIDS+=($!)
done

# `flwr run` right away may find no SuperLink yet
for _ in $(seq 120); do
  python -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' "$PORT" 2>/dev/null && break
  sleep 0.5
done
start=$(date +%s.%N)
SUBMITTED=$(flwr run "$APP" bench --format json \
  --run-config "task=\"mrpc\" clients=3 per-round=3 rounds=$ROUNDS local-epochs=$LOCAL_EPOCHS partition=\"iid\" round-timeout=36000.0 out=\"$OUT\"")
RUN_ID=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["run-id"])' "$SUBMITTED") ||
  { echo "flwr run did not start a run: $SUBMITTED"; tail -n 5 "$WORK"/*.log; exit 1; }
while :; do
  STATUS=$(flwr list bench --run-id "$RUN_ID" --format json |
    python -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  [[ $STATUS == finished* ]] && break
  sleep 20  # each `flwr list` costs about a second of CPU
done
end=$(date +%s.%N)
echo "status $STATUS; wall $(python -c "print(round($end - $start, 1))") s from flwr run to finished"
python -c "import json; s = json.load(open('$OUT/summary.json')); print('summary:', {k: s[k] for k in ('final_accuracy', 'final_f1', 'wall_seconds')})"
