#!/usr/bin/env bash
# Set up and run the main job: train Symbiotic-MoE (stage 1 base + stage 2) at demo size,
# write runs/demo-symbiotic/traces.zarr, diagnose it, and print what to do next.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo-symbiotic}
moe-probe train --recipe symbiotic --out "$OUT" "$@"
moe-probe info "$OUT"
