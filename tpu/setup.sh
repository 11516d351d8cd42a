#!/usr/bin/env bash
# Install orz_jax on every worker of the slice.
#
#   tpu/setup.sh --project P --zone Z --name orz-7b                 # ship this checkout's HEAD
#   tpu/setup.sh ... --ref my-branch                                # ship another local commit
#   tpu/setup.sh ... --repo https://github.com/me/orz_jax --ref main  # workers git-clone it instead
#   tpu/setup.sh ... --dry-run
#
# Copy mode packs the commit with `git archive` (committed files only: commit or pass extra files
# yourself), copies it to every worker and unpacks it into ~/orz_jax (replaced). Clone mode clones
# --repo at --ref into ~/orz_jax (replaced). Then, on every worker at once: a Python 3.11 virtualenv
# ~/orz_venv made with uv (the runtime images ship an older Python), and `pip install -e '.[tpu]'`.
# --python-version X.Y: another Python for the venv. --system-python: skip the venv and install into
# the image's python3 with `pip install --user`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_own_flag() {
  case "$1" in
    --repo) set_value REPO_URL "$@"; OWN_SHIFT=2 ;;
    --ref) set_value REPO_REF "$@"; OWN_SHIFT=2 ;;
    --python-version) set_value PYTHON_VERSION "$@"; OWN_SHIFT=2 ;;
    --system-python) SYSTEM_PYTHON=1; OWN_SHIFT=1 ;;
  esac
}

parse_flags "$@"
require_slice

REPO="$(remote_repo)"
VENV="$(remote_venv)"
TARBALL_REMOTE="orz_jax-src.tar.gz"

if [[ -z "$REPO_URL" ]]; then
  REF="${REPO_REF:-HEAD}"
  COMMIT="$(git -C "$TPU_REPO_ROOT" rev-parse --verify --quiet "${REF}^{commit}")" \
    || die "--ref ${REF}: not a commit in ${TPU_REPO_ROOT}"
  if [[ "$REF" == HEAD && -n "$(git -C "$TPU_REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
    echo "${SCRIPT_NAME}: warning: uncommitted changes are not shipped (git archive ${COMMIT:0:12})" >&2
  fi
  TARBALL="${TMPDIR:-/tmp}/orz_jax-${COMMIT:0:12}.tar.gz"
  run git -C "$TPU_REPO_ROOT" archive --format=tar.gz "--output=${TARBALL}" "$COMMIT"
  run gcloud compute tpus tpu-vm scp "$TARBALL" "${NAME}:${TARBALL_REMOTE}" --worker=all "${SLICE_FLAGS[@]}"
  fetch="rm -rf ${REPO} && mkdir -p ${REPO} && tar -xzf \$HOME/${TARBALL_REMOTE} -C ${REPO} && echo ${COMMIT} > ${REPO}/COMMIT"
else
  REF="${REPO_REF:-main}"
  fetch="rm -rf ${REPO} && git clone --quiet $(shquote "$REPO_URL") ${REPO} && git -C ${REPO} checkout --quiet $(shquote "$REF")"
fi

if [[ "$SYSTEM_PYTHON" -eq 1 ]]; then
  install="cd ${REPO} && python3 -m pip install --user --upgrade pip && python3 -m pip install --user -e '.[tpu]'"
else
  install="export PATH=\$HOME/.local/bin:\$PATH"
  install+=" && { command -v uv >/dev/null 2>&1 || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  install+=" && { [ -x ${VENV}/bin/python ] || uv venv --python $(shquote "$PYTHON_VERSION") ${VENV}; }"
  install+=" && cd ${REPO} && uv pip install --python ${VENV}/bin/python -e '.[tpu]'"
fi
# Import only: touching the TPU here would need every worker's process at once.
check="$(remote_python_snippet); \$PY -c 'import jax, orz_jax; print(\"jax\", jax.__version__, \"orz_jax ok\")'"

run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${SLICE_FLAGS[@]}" \
  "--command=set -euo pipefail; ${fetch}; ${install}; ${check}"
