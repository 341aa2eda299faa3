// Load the vendored plotly.js bundle (scatter, bar, heatmap: the trace types the pages draw;
// 1.18 MB instead of the full 4.8 MB bundle, see scripts/plotly_bundle.js) without blocking the
// page.
// dcc.Graph loads plotly.js through `Promise.resolve(window.Plotly || <full bundle>)`, so a
// promise here makes it wait for this bundle instead. The bundle sets window.Plotly to the
// library when it runs.
//
// When: running the bundle takes main thread (the 1.5 MB cartesian dist ~300 ms on a first
// visit, this bundle ~80 ms plus compiling). Started at once, it runs while Dash's renderer
// boots and delays every request of the page by that much (with the cartesian dist, Dash asked
// for its layout ~1.1 s after navigation on a first visit, ~0.3 s without). It starts instead
// once Dash has sent its first callback request: it then runs while the server computes the
// page (starting it at Dash's layout request instead was 1.09x slower, session 6).
// Removed from the page (dashboards/app.py) when plotly's Python package ships another
// plotly.js version than the one in vendor/.
(function () {
  if (window.Plotly) { return; }
  var src = new URL("vendor/plotly-dash.min.js", document.currentScript.src).href;
  var started = false, resolve, reject;
  window.Plotly = new Promise(function (res, rej) { resolve = res; reject = rej; });

  function load() {
    if (started) { return; }
    started = true;
    window.fetch = fetch0;
    var s = document.createElement("script");
    s.src = src;
    s.async = true;
    s.onload = function () { resolve(fitted(window.Plotly)); };
    s.onerror = function () {  // fall back to Dash's own full bundle
      var full = document.createElement("script");
      full.src = window._dashPlotlyJSURL;
      full.onload = function () { resolve(fitted(window.Plotly)); };
      full.onerror = function (e) { reject(e); };
      document.head.appendChild(full);
    };
    document.head.appendChild(s);
  }

  // dcc.Graph calls Plots.resize after a graph's first plot, and plotly then re-plots the graph
  // in full 100 ms later (a relayout of width and height: 35-70 ms a graph on a first visit),
  // even when it already fills its box. Skipped then; a box that changes size later reaches
  // here again through dcc.Graph's resize observer.
  function fitted(P) {
    var resize = P.Plots.resize;
    P.Plots.resize = function (gd) {
      var el = typeof gd === "string" ? document.getElementById(gd) : gd;
      var fl = el && el._fullLayout;
      if (fl) {
        var cs = window.getComputedStyle(el);
        if (Math.abs(parseFloat(cs.width) - fl.width) <= 1 &&
            Math.abs(parseFloat(cs.height) - fl.height) <= 1) { return Promise.resolve(el); }
      }
      return resize.apply(this, arguments);
    };
    return P;
  }

  var fetch0 = window.fetch;
  window.fetch = function (input) {
    var p = fetch0.apply(this, arguments);
    var url = typeof input === "string" ? input : (input && input.url) || "";
    // setTimeout: after the requests Dash sends in the same turn
    if (!started && url.indexOf("_dash-update-component") !== -1) { setTimeout(load, 0); }
    return p;
  };
  // A page without callbacks never asks: load anyway once the page has loaded.
  window.addEventListener("load", function () { setTimeout(load, 1000); });
})();
