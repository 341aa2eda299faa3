// Load plotly.js's cartesian bundle (bar, box, heatmap, scatter, ...: every trace type the
// pages draw; 1.5 MB instead of the full 4.8 MB bundle) without blocking the page.
// dcc.Graph loads plotly.js through `Promise.resolve(window.Plotly || <full bundle>)`, so a
// promise here makes it wait for this bundle instead, while Dash fetches the layout and runs
// the first callbacks. The bundle sets window.Plotly to the library when it runs.
// Removed from the page (dashboards/app.py) when plotly's Python package ships another
// plotly.js version than the one in vendor/.
(function () {
  if (window.Plotly) { return; }
  var src = new URL("vendor/plotly-cartesian.min.js", document.currentScript.src).href;
  window.Plotly = new Promise(function (resolve, reject) {
    var s = document.createElement("script");
    s.src = src;
    s.async = true;
    s.onload = function () { resolve(window.Plotly); };
    s.onerror = function () {  // fall back to Dash's own full bundle
      var full = document.createElement("script");
      full.src = window._dashPlotlyJSURL;
      full.onload = function () { resolve(window.Plotly); };
      full.onerror = function (e) { reject(e); };
      document.head.appendChild(full);
    };
    document.head.appendChild(s);
  });
})();
