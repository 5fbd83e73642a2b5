#!/usr/bin/env bash
# Sets up everything on a fresh Debian machine: the Fashion-MNIST data package, a virtual environment,
# the CPU build of PyTorch, and triaccel-rl with its dev extras. Safe to run again (it skips what is done).
#
#   scripts/setup.sh            # creates .venv in the repository root
#   VENV=/path scripts/setup.sh # elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Debian packages: the data, and the venv module (python3-venv: Debian's python3 comes without ensurepip).
PACKAGES=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${TRIACCEL_DATA:-}" ]; then
  PACKAGES+=(dataset-fashion-mnist)
fi
if ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
  PACKAGES+=("$("$PYTHON" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}-venv")')")
fi
if [ ${#PACKAGES[@]} -gt 0 ]; then
  echo "== installing the Debian packages ${PACKAGES[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi

# A venv without pip (one whose creation failed half way, before python3-venv was there) is made again.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "== creating $VENV"
  "$PYTHON" -m venv --clear "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "== installing PyTorch (a GPU is present: the default CUDA build)"
    "${PIP[@]}" install "torch>=2.4"
  else
    # On a CPU machine a plain `torch` resolves to a multi-GB CUDA build: pin the CPU build first.
    echo "== installing PyTorch (CPU build)"
    if ! "${PIP[@]}" install -r requirements/cpu-torch.txt 2>/dev/null; then  # not in a local wheel folder
      "${PIP[@]}" install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
echo "== installing triaccel-rl and its dev tools"
"${PIP[@]}" install -e ".[dev]"
echo "== ready: $VENV/bin/triaccel-rl"
