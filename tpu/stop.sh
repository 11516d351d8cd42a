#!/usr/bin/env bash
# Stop a run on every worker: SIGTERM to the process recorded in each worker's pid file, then
# SIGKILL after --grace seconds (default 30) if it is still alive.
#
#   tpu/stop.sh --project P --zone Z --name orz-7b [--run-name RUN]   # default: the latest run
#   tpu/stop.sh ... --dry-run
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GRACE=30
parse_own_flag() {
  case "$1" in
    --grace) set_value GRACE "$@"; OWN_SHIFT=2 ;;
  esac
}

parse_flags "$@"
require_slice
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace ${GRACE}: expected whole seconds"
RUN="${REMOTE_RUNS}/${RUN_NAME:-latest}"

remote="for f in ${RUN}/worker-*.pid; do [ -f \"\$f\" ] || continue; p=\$(cat \"\$f\")"
remote+="; if kill -0 \"\$p\" 2>/dev/null; then kill -TERM \"\$p\"; echo \"\$(hostname): sent TERM to \$p\""
remote+="; for i in \$(seq ${GRACE}); do kill -0 \"\$p\" 2>/dev/null || break; sleep 1; done"
remote+="; if kill -0 \"\$p\" 2>/dev/null; then kill -KILL \"\$p\"; echo \"\$(hostname): sent KILL to \$p\"; fi"
remote+="; else echo \"\$(hostname): \$p already gone\"; fi; done"

run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${SLICE_FLAGS[@]}" "--command=${remote}"
