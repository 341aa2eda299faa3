#!/usr/bin/env bash
# Build dashboards/assets/vendor/plotly-dash.min.js from plotly.js's sources on the npm registry,
# at the plotly.js version the installed plotly (Python) generates figures for, with the trace
# types of scripts/plotly_bundle.js. Run after upgrading plotly; until then the dashboard falls
# back to Dash's full bundle (dashboards/app.py). Needs node and npm; pulls ~180 MB into a
# temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
version=$("$py" -c "from plotly.offline import get_plotlyjs_version as v; print(v())")
out=dashboards/assets/vendor/plotly-dash.min.js
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp scripts/plotly_bundle.js "$tmp/entry.js"
(cd "$tmp" && npm init -y >/dev/null \
   && npm install --silent --no-audit --no-fund "plotly.js@${version}" esbuild@0.28.2 >/dev/null)
# The flags follow plotly.js's own esbuild-config.js; .css is maplibre's (map traces only).
"$tmp/node_modules/.bin/esbuild" "$tmp/entry.js" --bundle --minify --format=iife \
  --global-name=Plotly --target=es2016 --define:global=window --define:define.amd=false \
  --define:process.env.NODE_DEBUG=false --alias:stream=stream-browserify --loader:.css=empty \
  --log-level=warning --outfile="$tmp/plotly.min.js" \
  "--banner:js=/**
* plotly.js (moe_probe dashboard: core, bar, heatmap) v${version}
* Copyright 2012-2026, Plotly, Inc. Licensed under the MIT license (plotly.js-LICENSE)
*/"
cp "$tmp/plotly.min.js" "$out"
cp "$tmp/node_modules/plotly.js/LICENSE" dashboards/assets/vendor/plotly.js-LICENSE
head -c 200 "$out" | grep -q " v${version}$" || { echo "unexpected bundle header" >&2; exit 1; }
echo "built $out: plotly.js ${version}, $(wc -c < "$out") bytes"
