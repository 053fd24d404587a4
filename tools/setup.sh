#!/usr/bin/env bash
# Sets up everything Aviary needs and builds it. Idempotent: a second run only rebuilds.
#
#   tools/setup.sh            # Debian packages, Python venv with torch==2.11.0, build/ with CMake
#
# Environment knobs:
#   AVIARY_VENV=DIR       virtual environment to create or reuse (default ~/.cache/aviary/venv;
#                         outside the repo so fresh clones reuse it)
#   AVIARY_PYTHON=PATH    use this interpreter's torch instead of a venv (e.g. the GPU machine's
#                         system python, whose torch matches the local CUDA)
#   AVIARY_BUILD_DIR=DIR  build directory (default build/)
#   AVIARY_CUDA=AUTO|ON|OFF  CUDA kernels (default AUTO: on when nvcc is found)
#   AVIARY_REFERENCE=1    also install the Python packages used by tests/reference/*.py
#   AVIARY_SKIP_APT=1     do not run apt-get (packages already present)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
VENV=${AVIARY_VENV:-$HOME/.cache/aviary/venv}
BUILD_DIR=${AVIARY_BUILD_DIR:-build}
log() { printf '[setup] %s\n' "$*"; }

# ---- Debian packages --------------------------------------------------------------------------
APT_PACKAGES=(build-essential cmake ninja-build pkg-config python3-venv
  libspdlog-dev libfmt-dev nlohmann-json3-dev libyaml-cpp-dev libcli11-dev
  libsentencepiece-dev libre2-dev libgtest-dev libgmock-dev libbenchmark-dev
  libopenmpi-dev openmpi-bin)
if [[ "${AVIARY_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

# ---- Python with torch (LibTorch comes from the wheel) ----------------------------------------
if [[ -n "${AVIARY_PYTHON:-}" ]]; then
  PY=$AVIARY_PYTHON
else
  PY=$VENV/bin/python
  if [[ ! -x "$PY" ]]; then
    log "creating virtual environment $VENV"
    python3 -m venv "$VENV"
  fi
  have=$("$PY" -c 'import torch;print(torch.__version__.split("+")[0])' 2>/dev/null || true)
  if [[ "$have" != "$TORCH_VERSION" ]]; then
    log "installing torch==$TORCH_VERSION into $VENV (several GB, cached by pip afterwards)"
    "$PY" -m pip install -q "torch==$TORCH_VERSION" numpy
  fi
  if [[ "${AVIARY_REFERENCE:-0}" == 1 ]]; then
    "$PY" -m pip install -q -r tests/reference/requirements.txt
  fi
fi
log "torch: $("$PY" -c 'import torch;print(torch.__version__, "cuda", torch.version.cuda)')"

# ---- configure and build ----------------------------------------------------------------------
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
if [[ ! -f "$BUILD_DIR/CMakeCache.txt" ]]; then
  command -v nvcc >/dev/null || [[ ! -x /usr/local/cuda/bin/nvcc ]] || export PATH=/usr/local/cuda/bin:$PATH
  cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DAVIARY_PYTHON="$PY" -DAVIARY_CUDA="${AVIARY_CUDA:-AUTO}"
fi
JOBS=${AVIARY_JOBS:-$(nproc)}
log "building in $BUILD_DIR with $JOBS jobs"
cmake --build "$BUILD_DIR" -j "$JOBS"
log "done: $BUILD_DIR/aviary"
