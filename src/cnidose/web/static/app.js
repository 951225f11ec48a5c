// cnidose pages: draw the charts from the JSON the server embedded (Plotly served by the app itself), and
// again whenever htmx swaps a region in; say so when htmx gets an error answer (the swap is not made).
(function () {
  "use strict";
  function data(id) { var el = document.getElementById(id); return el ? JSON.parse(el.textContent) : null; }
  function ready() {
    if (typeof Plotly === "undefined") { return; }
    var c = data("curve-data");
    if (c && document.getElementById("curve-plot")) {
      if (c.hours) {  // hours after the origin (UTC) -> UTC clock times
        var o = Date.parse(c.origin);
        var clock = function (h) { return new Date(o + h * 3600000).toISOString().slice(0, 19); };
        c.time = c.hours.map(clock); c.observed_time = c.observed_hours.map(clock);
      }
      var t0 = c.time[0], t1 = c.time[c.time.length - 1];
      Plotly.newPlot("curve-plot", [
        { x: c.time, y: c.p90, mode: "lines", line: { width: 0 }, showlegend: false, hoverinfo: "skip" },
        { x: c.time, y: c.p10, mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(31,95,168,0.2)", name: "80 % band" },
        { x: c.time, y: c.p50, mode: "lines", line: { color: "#1f5fa8" }, name: "individual fit" },
        { x: c.observed_time, y: c.observed, mode: "markers", marker: { color: "#b3261e", size: 8 }, name: "measured" }
      ], {
        margin: { t: 10, r: 10, b: 40, l: 50 }, yaxis: { title: { text: c.unit }, rangemode: "tozero" },
        shapes: [{ type: "rect", xref: "x", yref: "y", x0: t0, x1: t1, y0: c.target[0], y1: c.target[1],
                   fillcolor: "rgba(26,127,55,0.12)", line: { width: 0 }, layer: "below" }],
        legend: { orientation: "h" }
      }, { displayModeBar: false, responsive: true });
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
      if (first) { first.selected = true; }
    }
    name.addEventListener("change", show);
    show();
  }
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
  function start() { ready(); labUnits(); }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
