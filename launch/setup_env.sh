#!/usr/bin/env bash
# Source this file: it makes sure a Python environment with the pinned stack is active.
#
# - If a virtual environment is already active ($VIRTUAL_ENV), it installs into it.
# - Otherwise it creates (once) and activates ./.venv in the repository.
# - CPU machines get requirements-cpu.txt (torch CPU + fbgemm-gpu-cpu). Machines with an NVIDIA
#   driver (nvidia-smi lists a GPU) get the CUDA fbgemm-gpu of the same version instead; set
#   ROBE_TORCHREC_STACK=cpu|cuda to force one.
# - torchrec is installed with --no-deps: its metadata demands the CUDA fbgemm-gpu wheel.
# - A stamp in the venv records what was installed, so a second call costs nothing.
_robe_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x "$_robe_root/.venv/bin/python" ]; then
    echo "[setup] creating virtual environment $_robe_root/.venv"
    python3 -m venv "$_robe_root/.venv" || return 1
  fi
  # shellcheck disable=SC1091
  source "$_robe_root/.venv/bin/activate"
fi

(
  set -euo pipefail
  stack="${ROBE_TORCHREC_STACK:-}"
  if [ -z "$stack" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      stack=cuda
    else
      stack=cpu
    fi
  fi
  reqs="$_robe_root/requirements-cpu.txt"
  stamp="$VIRTUAL_ENV/.robe-torchrec-stamp"
  want="$stack $(cat "$reqs" "$_robe_root/pyproject.toml" | sha256sum | cut -c1-16)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0

  echo "[setup] installing the pinned $stack stack into $VIRTUAL_ENV (about 80 s the first time)"
  pip_install() {
    # pip's notes about this machine's local index folders are filtered out; errors are kept.
    python -m pip install --disable-pip-version-check -q --progress-bar off "$@" 2>&1 \
      | { grep -v "is neither a file nor a directory" || true; }
  }
  if [ "$stack" = cuda ]; then
    # Same pins, but PyPI's CUDA build of fbgemm-gpu instead of fbgemm-gpu-cpu.
    grep -v '^fbgemm-gpu-cpu' "$reqs" > "$VIRTUAL_ENV/.robe-reqs-cuda.txt"
    pip_install -r "$VIRTUAL_ENV/.robe-reqs-cuda.txt" "fbgemm-gpu==1.8.0"
  else
    pip_install -r "$reqs"
  fi
  pip_install --no-deps "torchrec==1.8.0"
  pip_install --no-deps -e "$_robe_root"
  echo "$want" > "$stamp"
) || { echo "[setup] FAILED: see the pip output above" >&2; return 1 2>/dev/null || exit 1; }
