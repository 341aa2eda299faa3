// Entry of the plotly.js bundle the dashboard loads (built by scripts/vendor_plotly.sh):
// plotly's own core (scatter, every layout component, hover, modebar) plus the trace types the
// pages draw. It is 1.18 MB against 1.5 MB for plotly's cartesian dist; a first visit runs the
// bundle before any graph can draw, so every trace type left out is paint time saved.
// A page drawing another trace type needs it added here (tests/test_dash_browser.py checks
// that every trace on every page is drawn as the type it asked for).
'use strict';

var Plotly = require('plotly.js/lib/core');

Plotly.register([
    require('plotly.js/lib/bar'),      // modality share per expert
    require('plotly.js/lib/heatmap'),  // capacity, expert load, cosine, co-activation
]);

module.exports = Plotly;
