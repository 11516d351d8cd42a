# Shared flag parsing and helpers for the tpu/*.sh scripts. Sourced, never run.
#
# Every setting comes from a flag or, failing that, from an environment variable:
#   --project            TPU_PROJECT            GCP project
#   --zone               TPU_ZONE               zone, e.g. us-east5-a
#   --name               TPU_NAME               TPU VM / slice name (the queued resource's node id)
#   --qr-id              TPU_QR_ID              queued-resource id (default: <name>-qr)
#   --accelerator-type   TPU_ACCELERATOR_TYPE   e.g. v5p-8, v5p-128, v6e-8, v5litepod-16, v4-8
#   --runtime-version    TPU_RUNTIME_VERSION    default: the JAX image for the accelerator's generation
#   --config             ORZ_CONFIG             experiment YAML, a path inside the repository
#   --run-name           ORZ_RUN_NAME           log directory name on the workers (default: a timestamp)
#   --remote-dir         ORZ_REMOTE_DIR         checkout directory under $HOME on the workers (orz_jax)
#   --venv               ORZ_VENV               virtualenv directory under $HOME on the workers (orz_venv)
#   --dry-run                                   print the commands instead of running them
# Arguments after `--` are passed through (launch.sh: config overrides; create.sh: extra gcloud flags).

set -euo pipefail

TPU_SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TPU_REPO_ROOT="$(cd "${TPU_SCRIPT_DIR}/.." && pwd)"
SCRIPT_NAME="$(basename "$0")"

PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-}"
NAME="${TPU_NAME:-}"
QR_ID="${TPU_QR_ID:-}"
ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
CONFIG="${ORZ_CONFIG:-}"
RUN_NAME="${ORZ_RUN_NAME:-}"
REMOTE_DIR="${ORZ_REMOTE_DIR:-orz_jax}"
VENV_DIR="${ORZ_VENV:-orz_venv}"
DRY_RUN=0
SPOT=0
BEST_EFFORT=0
RESERVED=0
WAIT=0
REPO_URL=""
REPO_REF=""
SYSTEM_PYTHON=0
PYTHON_VERSION="3.11"
FOLLOW=1
FETCH_DIR=""
WORKER=""
NUM_WORKERS=""
FOREGROUND=0
ASYNC=0
ENV_VARS=()
EXTRA_ARGS=()

# The header comment of the running script is its help text.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 2
}

# Parse the shared flags; a script's own flags are handled by its `parse_own_flag` function,
# which gets "$@" and must set OWN_SHIFT to the number of arguments it used (0: not its flag).
parse_flags() {
  while [[ $# -gt 0 ]]; do
    local flag="$1" value=""
    # --flag=value form
    if [[ "$flag" == --*=* ]]; then
      value="${flag#*=}"
      flag="${flag%%=*}"
      set -- "$flag" "$value" "${@:2}"
    fi
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --project) set_value PROJECT "$@"; shift 2 ;;
      --zone) set_value ZONE "$@"; shift 2 ;;
      --name) set_value NAME "$@"; shift 2 ;;
      --qr-id) set_value QR_ID "$@"; shift 2 ;;
      --accelerator-type) set_value ACCELERATOR_TYPE "$@"; shift 2 ;;
      --runtime-version) set_value RUNTIME_VERSION "$@"; shift 2 ;;
      --config) set_value CONFIG "$@"; shift 2 ;;
      --run-name) set_value RUN_NAME "$@"; shift 2 ;;
      --remote-dir) set_value REMOTE_DIR "$@"; shift 2 ;;
      --venv) set_value VENV_DIR "$@"; shift 2 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      *)
        OWN_SHIFT=0
        if declare -F parse_own_flag >/dev/null; then parse_own_flag "$@"; fi
        if [[ "$OWN_SHIFT" -eq 0 ]]; then
          die "unknown argument '$1' (see ${SCRIPT_NAME} --help)"
        fi
        shift "$OWN_SHIFT"
        ;;
    esac
  done
}

# set_value VAR --flag VALUE ...: VAR=VALUE, or fail when the value is missing.
set_value() {
  local var="$1"
  shift
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
  printf -v "$var" '%s' "$2"
}

# require VAR_NAME --flag ENV_NAME: fail with a message naming both ways to set it.
require() {
  local var="$1" flag="$2" env="$3"
  [[ -n "${!var}" ]] || die "missing ${flag} (or set ${env})"
}

require_slice() {
  require PROJECT --project TPU_PROJECT
  require ZONE --zone TPU_ZONE
  require NAME --name TPU_NAME
  QR_ID="${QR_ID:-${NAME}-qr}"
  # gcloud flags every command on this slice shares
  SLICE_FLAGS=("--zone=${ZONE}" "--project=${PROJECT}")
}

# Quote one word for a POSIX shell only when it needs it, so printed commands stay readable
# and can be pasted back into a shell.
shquote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

join_quoted() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(shquote "$w")"; done
  printf '%s' "$out"
}

# Run a command, or with --dry-run print it (one line, quoted) and carry on.
run() {
  if [[ "$DRY_RUN" -eq 1 ]]; then
    join_quoted "$@"
    printf '\n'
  else
    echo "+ $(join_quoted "$@")" >&2
    "$@"
  fi
}

# Default runtime image per TPU generation (Cloud TPU "TPU software versions" page).
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-*|v3-*|v2-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

# Number of TPU VM hosts (workers) in a slice. v4/v5p: the suffix counts TensorCores, 2 per chip,
# 4 chips per host. v5e/v6e: the suffix counts chips; up to 8 chips sit on one host, larger
# slices have 4 chips per host.
workers_for_accelerator() {
  local type="$1" n="${1##*-}"
  [[ "$n" =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$type'"
  case "$type" in
    v4-*|v5p-*) local chips=$((n / 2)); echo $(( chips <= 4 ? 1 : chips / 4 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( n <= 8 ? 1 : n / 4 )) ;;
    *) die "unknown accelerator type '$type'; pass --num-workers" ;;
  esac
}

# Where runs live on each worker (a shell expression expanded there); `latest` links the newest run.
REMOTE_RUNS='$HOME/orz_runs'

# The remote checkout and virtualenv as shell expressions expanded on the worker.
remote_repo() {
  printf '%s' "\$HOME/$(shquote "$REMOTE_DIR")"
}
remote_venv() {
  printf '%s' "\$HOME/$(shquote "$VENV_DIR")"
}

# Shell snippet (for a worker) that sets PY to the venv's python, or python3 without a venv.
remote_python_snippet() {
  printf '%s' "PY=$(remote_venv)/bin/python; [ -x \"\$PY\" ] || PY=python3"
}
