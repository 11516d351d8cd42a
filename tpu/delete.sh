#!/usr/bin/env bash
# Delete the slice: the queued resource and, with --force, the TPU VM node it created.
#
#   tpu/delete.sh --project P --zone Z --name orz-7b [--qr-id ID] [--async]
#   tpu/delete.sh ... --dry-run
#
# Logs on the workers are lost: fetch them first (tpu/logs.sh --fetch DIR).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_own_flag() {
  case "$1" in
    --async) ASYNC=1; OWN_SHIFT=1 ;;
  esac
}

parse_flags "$@"
require_slice
cmd=(gcloud compute tpus queued-resources delete "$QR_ID" "${SLICE_FLAGS[@]}" --force --quiet)
[[ "$ASYNC" -eq 1 ]] && cmd+=(--async)
run "${cmd[@]}"
