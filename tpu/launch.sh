#!/usr/bin/env bash
# Start training on every worker of the slice at once (JAX multi-controller: one Python process per
# host, all running the same program; on TPU VMs `jax.distributed.initialize()` needs no arguments).
#
#   tpu/launch.sh --project P --zone Z --name orz-7b --config configs/orz_7b.yaml [-- key=value ...]
#   tpu/launch.sh ... --run-name 7b-try2 --env XLA_FLAGS=--xla_dump_to=/tmp/x --foreground
#   tpu/launch.sh ... --dry-run
#
# Runs `python -u -m orz_jax.launch --config CONFIG [overrides]` in ~/orz_jax on every worker, detached
# with nohup; worker W writes ~/orz_runs/RUN/worker-W.log and worker-W.pid (W from the TPU VM's
# metadata), and ~/orz_runs/latest links the newest run. Refuses to start while the latest run still
# has a live process (tpu/stop.sh ends it). --foreground: stay attached and stream every worker's log
# until its process ends, then exit with its status (Ctrl-C stops only the streaming). --env KEY=VALUE (repeatable): exported
# before the start.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_own_flag() {
  case "$1" in
    --env)
      local kv
      set_value kv "$@"
      [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env ${kv}: expected KEY=VALUE"
      ENV_VARS+=("$kv"); OWN_SHIFT=2 ;;
    --foreground) FOREGROUND=1; OWN_SHIFT=1 ;;
  esac
}

parse_flags "$@"
require_slice
require CONFIG --config ORZ_CONFIG
RUN_NAME="${RUN_NAME:-orz-$(date -u +%Y%m%d-%H%M%S)}"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name ${RUN_NAME}: use letters, digits, '.', '_', '-'"
if [[ "$CONFIG" != /* && ! -f "${TPU_REPO_ROOT}/${CONFIG}" ]]; then
  echo "${SCRIPT_NAME}: warning: ${CONFIG} is not in this checkout; it must exist in ~/${REMOTE_DIR} on the workers" >&2
fi

REPO="$(remote_repo)"
RUN="${REMOTE_RUNS}/${RUN_NAME}"
WORKER_ID='$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname)'

train="\$PY -u -m orz_jax.launch --config $(shquote "$CONFIG")"
for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do train+=" $(shquote "$arg")"; done

remote="set -euo pipefail"
remote+="; for f in ${REMOTE_RUNS}/latest/worker-*.pid; do if [ -f \"\$f\" ] && kill -0 \"\$(cat \"\$f\")\" 2>/dev/null; then echo \"a run is still going (\$f); stop it with tpu/stop.sh\" >&2; exit 1; fi; done"
remote+="; cd ${REPO}"
remote+="; mkdir -p ${RUN} && ln -sfn ${RUN} ${REMOTE_RUNS}/latest"
remote+="; W=${WORKER_ID}; LOG=${RUN}/worker-\$W.log"
remote+="; $(remote_python_snippet)"
for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do remote+="; export ${kv%%=*}=$(shquote "${kv#*=}")"; done
remote+="; nohup ${train} > \"\$LOG\" 2>&1 < /dev/null & echo \$! > ${RUN}/worker-\$W.pid"
remote+="; echo \"worker \$W: pid \$(cat ${RUN}/worker-\$W.pid), log \$LOG\""
if [[ "$FOREGROUND" -eq 1 ]]; then
  # Follow the log until the process ends (interrupting only stops the following), then exit with
  # its status. The trailing `wait` also keeps bash from exec'ing tail in its place: tail would
  # become the parent of the training process and, never reaping it, wait on its zombie forever.
  remote+="; P=\$(cat ${RUN}/worker-\$W.pid); tail -n +1 -F --pid=\"\$P\" \"\$LOG\"; wait \"\$P\""
fi

run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${SLICE_FLAGS[@]}" "--command=${remote}"
if [[ "$DRY_RUN" -eq 0 && "$FOREGROUND" -eq 0 ]]; then
  echo "started run ${RUN_NAME}; follow it with: tpu/logs.sh --name ${NAME} --zone ${ZONE} --project ${PROJECT} --run-name ${RUN_NAME}" >&2
fi
