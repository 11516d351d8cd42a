#!/usr/bin/env bash
# Stream or fetch a run's logs.
#
#   tpu/logs.sh --project P --zone Z --name orz-7b                 # follow worker 0 of the latest run
#   tpu/logs.sh ... --worker all                                   # follow every worker (interleaved)
#   tpu/logs.sh ... --fetch ./logs --accelerator-type v5p-128      # copy every worker's log here
#   tpu/logs.sh ... --run-name RUN --dry-run
#
# --fetch DIR copies ~/orz_runs/RUN/worker-*.log from each worker into DIR/RUN/ (one scp per worker;
# the worker count comes from --num-workers or from --accelerator-type).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_own_flag() {
  case "$1" in
    --fetch) set_value FETCH_DIR "$@"; OWN_SHIFT=2 ;;
    --worker) set_value WORKER "$@"; OWN_SHIFT=2 ;;
    --num-workers) set_value NUM_WORKERS "$@"; OWN_SHIFT=2 ;;
  esac
}

parse_flags "$@"
require_slice
RUN="${RUN_NAME:-latest}"

if [[ -z "$FETCH_DIR" ]]; then
  WORKER="${WORKER:-0}"
  [[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker ${WORKER}: expected a number or 'all'"
  run gcloud compute tpus tpu-vm ssh "$NAME" "--worker=${WORKER}" "${SLICE_FLAGS[@]}" \
    "--command=tail -n 200 -F ${REMOTE_RUNS}/${RUN}/worker-*.log"
  exit 0
fi

if [[ -z "$NUM_WORKERS" ]]; then
  [[ -n "$ACCELERATOR_TYPE" ]] || die "--fetch needs the worker count: pass --num-workers N or --accelerator-type (or set TPU_ACCELERATOR_TYPE)"
  NUM_WORKERS="$(workers_for_accelerator "$ACCELERATOR_TYPE")" || exit 2
fi
[[ "$NUM_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--num-workers ${NUM_WORKERS}: expected a positive number"
DEST="${FETCH_DIR%/}/${RUN}"
run mkdir -p "$DEST"
for ((w = 0; w < NUM_WORKERS; w++)); do
  run gcloud compute tpus tpu-vm scp "${NAME}:orz_runs/${RUN}/worker-*.log" "${DEST}/" "--worker=${w}" "${SLICE_FLAGS[@]}"
done
