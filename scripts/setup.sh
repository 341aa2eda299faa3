#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with moe_probe and its test tools.
# Idempotent: a second run only checks. torch is pinned to the local CPU build through
# constraints.txt (an unpinned torch pulls several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e ".${extras}"
if [ "${1:-}" = "--test" ]; then
  # Dashboard tests drive Debian's Chromium; test tools never download a browser of their own.
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  python -m ipykernel install --user --name python3 >/dev/null 2>&1 || true
fi
