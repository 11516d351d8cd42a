#!/usr/bin/env bash
# Create a TPU VM or pod slice through a queued resource.
#
#   tpu/create.sh --project P --zone us-east5-a --name orz-7b --accelerator-type v5p-8 [--spot] [--wait]
#   tpu/create.sh ... --dry-run          # print the gcloud command(s) only
#
# A queued resource waits in line until capacity is free, then creates the node `--name`.
# --spot: preemptible Spot capacity. --best-effort: best-effort capacity (a gcloud alpha flag, so the
# alpha command group is used). --reserved: draw from the project's reservation. --wait: poll until
# the queued resource is ACTIVE (fails if it ends FAILED or SUSPENDED). Extra gcloud flags after `--`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_own_flag() {
  case "$1" in
    --spot) SPOT=1; OWN_SHIFT=1 ;;
    --best-effort) BEST_EFFORT=1; OWN_SHIFT=1 ;;
    --reserved) RESERVED=1; OWN_SHIFT=1 ;;
    --wait) WAIT=1; OWN_SHIFT=1 ;;
  esac
}

parse_flags "$@"
require_slice
require ACCELERATOR_TYPE --accelerator-type TPU_ACCELERATOR_TYPE
RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}" || exit 2
[[ $((SPOT + BEST_EFFORT + RESERVED)) -le 1 ]] || die "choose at most one of --spot, --best-effort, --reserved"

GCLOUD=(gcloud)
[[ "$BEST_EFFORT" -eq 1 ]] && GCLOUD+=(alpha)

cmd=("${GCLOUD[@]}" compute tpus queued-resources create "$QR_ID"
  "--node-id=${NAME}" "${SLICE_FLAGS[@]}"
  "--accelerator-type=${ACCELERATOR_TYPE}" "--runtime-version=${RUNTIME_VERSION}")
[[ "$SPOT" -eq 1 ]] && cmd+=(--spot)
[[ "$BEST_EFFORT" -eq 1 ]] && cmd+=(--best-effort)
[[ "$RESERVED" -eq 1 ]] && cmd+=(--reserved)
cmd+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
run "${cmd[@]}"

if [[ "$WAIT" -eq 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${SLICE_FLAGS[@]}" "--format=value(state.state)")
  if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "# then, every 30 s until it prints ACTIVE:"
    run "${describe[@]}"
    exit 0
  fi
  while true; do
    state="$("${describe[@]}")"
    echo "$(date -u +%H:%M:%S) ${QR_ID}: ${state}" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED) die "queued resource ${QR_ID} is ${state}; see: gcloud compute tpus queued-resources describe ${QR_ID} --zone=${ZONE} --project=${PROJECT}" ;;
    esac
    sleep 30
  done
fi
