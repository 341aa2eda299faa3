#!/usr/bin/env bash
# Refresh dashboards/assets/vendor/plotly-cartesian.min.js from the npm registry, at the
# plotly.js version the installed plotly (Python) generates figures for. Run after upgrading
# plotly; until then the dashboard falls back to Dash's full bundle (dashboards/app.py).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
version=$("$py" -c "from plotly.offline import get_plotlyjs_version as v; print(v())")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "plotly.js-cartesian-dist-min@${version}" >/dev/null && tar xzf ./*.tgz)
cp "$tmp/package/plotly-cartesian.min.js" dashboards/assets/vendor/plotly-cartesian.min.js
cp "$tmp/package/LICENSE" dashboards/assets/vendor/plotly.js-LICENSE
head -c 120 dashboards/assets/vendor/plotly-cartesian.min.js | grep -q " v${version}$" \
  || { echo "unexpected bundle header" >&2; exit 1; }
echo "vendored plotly.js cartesian ${version}"
