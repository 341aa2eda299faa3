// Clientside callbacks of the pages (registered in dashboards/pages_common.py and pages/).
//
// zoom: zoom requests, filtered in the browser. A graph reports relayoutData after every draw
// (autosize), legend click or y zoom; sent to the server, each would re-run (and, while the
// first call of a page is in flight, supersede) the view's callback. Only a change of the
// visible x range is written to the view's zoom store, with the selection it was made in.

// How long `drawn` waits for a first screen before it lets the rest of the page go anyway.
const DRAWN_WAIT_MS = 10000;

window.dash_clientside = Object.assign({}, window.dash_clientside, {
  moe_probe: {
    zoom: function () {
      const sel = arguments[arguments.length - 1];
      const trig = window.dash_clientside.callback_context.triggered;
      const range = trig.length ? xRange(trig[0].value) : undefined;
      if (range === undefined) { return window.dash_clientside.no_update; }
      return {range: range, sel: sel};
    },

    // stale: a page's first screen is built with the selection the browser had when it asked
    // for the page (pages_common.first_screen); a change of it while the page was on its way
    // (a run ticked just before a click on Compare) reached no view of the page yet. Then this
    // writes the page's stale store, which the first screen's callbacks take as an Input.
    stale: function (built, sel) {
      const key = o => JSON.stringify(o || {}, Object.keys(o || {}).sort());
      return key(built) === key(sel) ? window.dash_clientside.no_update : Date.now();
    },

    // drawn: resolves (true) once plotly has plotted each graph in `ids` (it sets _fullLayout
    // when it starts plotting one; this polls from its own tasks, and plotting these traces
    // takes a single task), or after DRAWN_WAIT_MS whatever happened: a graph that never draws
    // must not hold the rest of the page back. Views below the first screen take its output as
    // an Input (pages/routing.py): Dash runs them only then.
    drawn: function (ids) {
      const t0 = performance.now();
      return new Promise(function (resolve) {
        (function poll() {
          const done = (ids || []).every(function (id) {
            const gd = document.querySelector("#" + CSS.escape(id) + " .js-plotly-plot");
            return gd && gd._fullLayout;
          });
          if (done || performance.now() - t0 > DRAWN_WAIT_MS) { resolve(true); }
          else { setTimeout(poll, 20); }
        })();
      });
    }
  }
});

// undefined: the x range did not change; null: back to all steps; else [lo, hi]. Any x axis
// counts (`xaxis2.range[0]`... in subplots whose x axes are linked).
function xRange(relayout) {
  if (!relayout) { return undefined; }
  for (const key of Object.keys(relayout)) {
    const m = /^(xaxis\d*)(\.autorange|\.range\[0\]|\.range)$/.exec(key);
    if (!m) { continue; }
    const axis = m[1], part = m[2], v = relayout[key];
    if (part === ".autorange" && v) { return null; }
    if (part === ".range[0]" && (axis + ".range[1]") in relayout) {
      return [Number(v), Number(relayout[axis + ".range[1]"])];
    }
    if (part === ".range" && Array.isArray(v) && v.length === 2) {
      return [Number(v[0]), Number(v[1])];
    }
  }
  return undefined;
}
