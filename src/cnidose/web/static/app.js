// cnidose pages: draw the charts from the JSON the server embedded (Plotly served by the app itself), and
// again whenever htmx swaps a region in; say so when htmx gets an error answer (the swap is not made).
(function () {
  "use strict";
  function data(id) { var el = document.getElementById(id); return el ? JSON.parse(el.textContent) : null; }
  function ready() {
    if (typeof Plotly === "undefined") { return; }
    var c = data("curve-data");
    if (c && document.getElementById("curve-plot")) {
      // times arrive as wall-clock times in the app's zone (c.timezone); Plotly draws them as they are
      var traces = [], t = [].concat(c.levels.time, c.doses.time);
      function band(x, s, colour, fill, name, dash) {
        traces.push({ x: x, y: s.p90, mode: "lines", line: { width: 0 }, showlegend: false, hoverinfo: "skip" });
        traces.push({ x: x, y: s.p10, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: fill, showlegend: false, hoverinfo: "skip" });
        traces.push({ x: x, y: s.p50, mode: "lines", line: { color: colour, dash: dash || "solid" }, name: name });
        t = t.concat(x);
      }
      if (c.fit) { band(c.fit.time, c.fit, "#1f5fa8", "rgba(31,95,168,0.2)", "individual fit (median, 80 % band)"); }
      if (c.forecast) {
        var f = c.forecast;
        if (f.current) { band(f.time, f.current, "#b35900", "rgba(179,89,0,0.15)", "current: " + f.current.dose + " mg every " + f.current.interval + " h", "dot"); }
        if (f.proposed) { band(f.time, f.proposed, "#6a3d9a", "rgba(106,61,154,0.18)", "proposed: " + f.proposed.dose + " mg every " + f.proposed.interval + " h", "dash"); }
      }
      traces.push({ x: c.levels.time, y: c.levels.value, mode: "markers", marker: { color: "#b3261e", size: 9 }, name: "measured level",
                    text: c.levels.sample, hovertemplate: "%{y} " + c.unit + " (%{text})<extra></extra>" });
      if (c.doses.time.length) {
        traces.push({ x: c.doses.time, y: c.doses.time.map(function () { return 0; }), mode: "markers", name: "dose given",
                      marker: { symbol: "triangle-up", color: "#555", size: 8 }, text: c.doses.mg,
                      hovertemplate: "%{text} mg<extra>dose</extra>" });
      }
      t.sort();
      var shapes = c.target ? [{ type: "rect", xref: "x", yref: "y", x0: t[0], x1: t[t.length - 1], y0: c.target[0], y1: c.target[1],
                                 fillcolor: "rgba(26,127,55,0.14)", line: { width: 0 }, layer: "below" }] : [];
      Plotly.newPlot("curve-plot", traces, {
        margin: { t: 40, r: 10, b: 40, l: 50 }, yaxis: { title: { text: c.unit }, rangemode: "tozero" },
        xaxis: { title: { text: "time (" + c.timezone + ")", standoff: 4 } }, shapes: shapes,
        legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" }
      }, { displayModeBar: false, responsive: true });
    }
    if (c && c.pd && document.getElementById("pd-plot")) {
      var pt = [], colours = ["#1f5fa8", "#0b7a75", "#8a3ffc"];
      c.pd.forEach(function (m, i) {
        var col = colours[i % colours.length], pct = function (xs) { return xs.map(function (x) { return 100 * x; }); };
        pt.push({ x: m.fit_time, y: pct(m.fit), mode: "lines", line: { color: col }, name: m.effect + " (fit)" });
        if (m.current) { pt.push({ x: m.forecast_time, y: pct(m.current), mode: "lines", line: { color: col, dash: "dot" }, name: m.effect + " (current)" }); }
        if (m.proposed) { pt.push({ x: m.forecast_time, y: pct(m.proposed), mode: "lines", line: { color: col, dash: "dash" }, name: m.effect + " (proposed)" }); }
      });
      Plotly.newPlot("pd-plot", pt, { margin: { t: 40, r: 10, b: 40, l: 50 }, yaxis: { title: { text: "% of maximal effect" }, range: [0, 100] },
                                      xaxis: { title: { text: "time (" + c.timezone + ")", standoff: 4 } },
                                      legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" } },
                     { displayModeBar: false, responsive: true });
    }
    var tr = data("trend-data");
    if (tr && document.getElementById("trend-plot") && (tr.egfr.length || tr.bp.length)) {
      Plotly.newPlot("trend-plot", [
        { x: tr.egfr.map(function (r) { return r[0]; }), y: tr.egfr.map(function (r) { return r[1]; }), name: "eGFR (mL/min/1.73 m²)", mode: "lines+markers" },
        { x: tr.bp.map(function (r) { return r[0]; }), y: tr.bp.map(function (r) { return r[1]; }), name: "systolic (mmHg)", mode: "lines+markers", yaxis: "y2" },
        { x: tr.bp.map(function (r) { return r[0]; }), y: tr.bp.map(function (r) { return r[2]; }), name: "diastolic (mmHg)", mode: "lines+markers", yaxis: "y2" }
      ], { margin: { t: 10, r: 50, b: 40, l: 50 }, yaxis: { title: { text: "eGFR" } },
           yaxis2: { title: { text: "mmHg" }, overlaying: "y", side: "right" }, legend: { orientation: "h" } },
         { displayModeBar: false, responsive: true });
    }
  }
  // the lab form: offer only the chosen test's units, its canonical unit selected
  function labUnits() {
    var name = document.getElementById("lab-name"), unit = document.getElementById("lab-unit");
    if (!name || !unit || unit.dataset.bound) { return; }
    unit.dataset.bound = "1";
    var groups = Array.prototype.slice.call(unit.querySelectorAll("optgroup"));
    function show() {
      var first = null;
      groups.forEach(function (g) {
        var mine = g.dataset.lab === name.value;
        g.hidden = !mine; g.disabled = !mine;
        if (mine && !first) { first = g.querySelector("option"); }
      });
      var sel = unit.options[unit.selectedIndex];
      if (first && !(sel && sel.parentNode.dataset.lab === name.value)) { first.selected = true; }
    }
    name.addEventListener("change", show);
    show();
  }
  // a refused entry comes back as its own form's box: bring the field in error into view and focus it
  function focusError(e) {
    var box = e.detail && e.detail.elt, bad = box && box.querySelector ? box.querySelector("[aria-invalid=true], #confirm-entry") : null;
    if (!bad) { bad = document.querySelector("[aria-invalid=true]"); }
    if (bad) { bad.scrollIntoView({ block: "center" }); bad.focus({ preventScroll: true }); }
  }
  document.addEventListener("htmx:afterSettle", focusError);
  document.addEventListener("htmx:afterSettle", labUnits);
  document.addEventListener("htmx:afterSettle", ready);
  document.addEventListener("htmx:beforeRequest", function () {
    var s = document.getElementById("htmx-status"); if (s) { s.hidden = true; }
  });
  function failed(e) {
    var s = document.getElementById("htmx-status"), x = e.detail.xhr;
    if (!s) { return; }
    s.textContent = x && x.status ? "The server answered " + x.status + ": " + (x.responseText || "").replace(/<[^>]*>/g, " ").trim().slice(0, 300) + " (reload the page)"
                                  : "The server could not be reached: nothing was saved by this request.";
    s.hidden = false;
  }
  document.addEventListener("htmx:responseError", failed);
  document.addEventListener("htmx:sendError", failed);
  function start() { ready(); labUnits(); focusError({}); }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
