"use strict";
// The flowyml run report: totals, timeline, concurrency chart and a virtualized step table,
// drawn from the JSON embedded in this page. No network, no libraries.
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var steps = data.steps;
  var SVG = "http://www.w3.org/2000/svg";
  var byName = {};
  var DEFAULTS = {
    start_offset: null, end_offset: null, duration_seconds: null, attempts: 0, errors: [], cache_key: null,
    cache_reason: null, time_saved_seconds: null, skip_reason: null, fallback_reasons: [], executor: null,
    cache_policy: null, group: null, resources: {}, tags: {}, inputs: [], outputs: [],
    earlier_attempt_errors_recorded: false, items: null
  };
  steps.forEach(function (s, i) {
    for (var k in DEFAULTS) if (!(k in s)) s[k] = DEFAULTS[k];
    s._i = i;
    byName[s.name] = s;
  });

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) node.setAttribute(k, attrs[k]);
    return node;
  }
  function secs(v) {
    if (v === null || v === undefined) return "–";
    if (v < 0.001) return (v * 1e6).toFixed(0) + " µs";
    if (v < 1) return (v * 1000).toFixed(1) + " ms";
    if (v < 60) return v.toFixed(2) + " s";
    if (v < 3600) return Math.floor(v / 60) + " m " + (v % 60).toFixed(0) + " s";
    return Math.floor(v / 3600) + " h " + Math.floor((v % 3600) / 60) + " m";
  }
  function bytes(size) {
    if (!size || size.bytes === null || size.bytes === undefined) return "–";
    var b = size.bytes, units = ["B", "KiB", "MiB", "GiB"], u = 0;
    while (b >= 1024 && u < units.length - 1) { b /= 1024; u++; }
    var text = (u ? b.toFixed(1) : String(b)) + " " + units[u];
    return size.len !== null && size.len !== undefined ? text + " (" + size.len + " items)" : text;
  }
  function itemCounts(counts) {
    return Object.keys(counts).map(function (k) { return k + " " + counts[k]; }).join(", ");
  }
  function errorText(s) {
    if (!s.errors.length) return "";
    var e = s.errors[s.errors.length - 1];
    return (e.type || "error") + ": " + (e.message || "");
  }

  // -- header and totals ------------------------------------------------------------------------
  document.getElementById("title").textContent = "Run of " + data.pipeline + ": " + data.state;
  document.getElementById("subtitle").textContent =
    "run " + data.run_id + " · started " + new Date(data.started_at * 1000).toLocaleString() +
    (data.source === "store" ? " · read back from the store" : "");
  var totals = document.getElementById("totals");
  function card(label, value, id) {
    var c = el("div", { "class": "card", id: id });
    c.appendChild(el("div", { "class": "label" }, label));
    c.appendChild(el("div", { "class": "value" }, value));
    totals.appendChild(c);
    return c;
  }
  card("state", data.state, "total-state");
  card("duration", secs(data.duration_seconds), "total-duration");
  card("steps", data.steps_total, "total-steps");
  var saved = data.time_saved;
  var savedText = secs(saved.seconds) + " by " + saved.cached_steps + " cache hit" + (saved.cached_steps === 1 ? "" : "s");
  var savedCard = card("time saved by the cache", savedText, "total-saved");
  if (saved.unknown_steps.length) {
    savedCard.appendChild(el("div", { "class": "label" }, saved.unknown_steps.length + " hit(s) with unknown original time"));
  }
  card("peak concurrency", data.peak_concurrency, "total-peak");
  if (data.items) {
    card("items of " + data.items.mapped_steps + " mapped step" + (data.items.mapped_steps === 1 ? "" : "s"),
      data.items.total + " (" + itemCounts(data.items.counts) + ")", "total-items");
  }
  var paramNames = Object.keys(data.params || {});
  if (paramNames.length) {
    card("parameters", paramNames.map(function (k) { return k + "=" + data.params[k]; }).join(", "), "total-params");
  }
  var countsCard = card("counts by status", "", "total-counts");
  var legend = document.getElementById("legend");
  Object.keys(data.counts).forEach(function (status) {
    countsCard.lastChild.appendChild(el("span", { "class": "chip st-" + status, "data-status": status }, status + " " + data.counts[status]));
    legend.appendChild(el("span", { "class": "chip st-" + status }, status));
  });
  if (data.graph.not_run.length) legend.appendChild(el("span", { "class": "chip st-not_run" }, "not run (If branch not chosen)"));

  // -- timeline ---------------------------------------------------------------------------------
  var timed = steps.filter(function (s) { return s.start_offset !== null && s.end_offset !== null; });
  timed.sort(function (a, b) { return a.start_offset - b.start_offset || a._i - b._i; });
  var span = Math.max(data.duration_seconds || 0, 1e-6);
  timed.forEach(function (s) { span = Math.max(span, s.end_offset); });
  var laneEnds = [];
  timed.forEach(function (s) {
    var lane = -1;
    for (var i = 0; i < laneEnds.length; i++) if (laneEnds[i] <= s.start_offset) { lane = i; break; }
    if (lane < 0) { lane = laneEnds.length; laneEnds.push(0); }
    laneEnds[lane] = Math.max(s.end_offset, s.start_offset + span / 2000);
    s._lane = lane;
  });
  var W = Math.max(720, (document.getElementById("timeline").clientWidth || 1000) - 20);
  var LEFT = 40, AXIS = 22;
  var laneH = laneEnds.length > 150 ? 4 : laneEnds.length > 60 ? 8 : 16;
  var H = AXIS + Math.max(1, laneEnds.length) * laneH + 6;
  var scale = (W - LEFT - 10) / span;
  function axis(svg, height) {
    var g = svgEl("g", { "class": "axis" });
    for (var t = 0; t <= 10; t++) {
      var x = LEFT + (W - LEFT - 10) * t / 10;
      g.appendChild(svgEl("line", { x1: x, x2: x, y1: 14, y2: height }));
      var label = svgEl("text", { x: x, y: 11, "text-anchor": "middle" });
      label.textContent = secs(span * t / 10);
      g.appendChild(label);
    }
    svg.appendChild(g);
  }
  var tl = svgEl("svg", { id: "timeline-svg", width: W, height: H, role: "img", "aria-label": "timeline" });
  axis(tl, H);
  var frag = document.createDocumentFragment();
  timed.forEach(function (s) {
    var w = Math.max(2, (s.end_offset - s.start_offset) * scale);
    var r = svgEl("rect", {
      "class": "bar st-" + s.status, x: (LEFT + s.start_offset * scale).toFixed(1), y: AXIS + s._lane * laneH,
      width: w.toFixed(1), height: Math.max(2, laneH - 2), "data-step": s.name
    });
    var title = svgEl("title");
    title.textContent = s.name + " · " + s.status + " · " + secs(s.duration_seconds) + " from " + secs(s.start_offset);
    r.appendChild(title);
    frag.appendChild(r);
  });
  tl.appendChild(frag);
  tl.addEventListener("click", function (ev) {
    var name = ev.target.getAttribute && ev.target.getAttribute("data-step");
    if (name) select(name, true);
  });
  document.getElementById("timeline").appendChild(tl);

  // -- concurrency over time --------------------------------------------------------------------
  var series = data.concurrency, peak = Math.max(1, data.peak_concurrency), CH = 120;
  var cs = svgEl("svg", { id: "concurrency-svg", width: W, height: CH + AXIS, role: "img", "aria-label": "concurrency over time" });
  axis(cs, CH + AXIS);
  var d = "M " + LEFT + " " + (CH + AXIS), last = 0;
  series.forEach(function (p) {
    var x = (LEFT + p[0] * scale).toFixed(1);
    d += " L " + x + " " + (AXIS + CH - last * CH / peak).toFixed(1) + " L " + x + " " + (AXIS + CH - p[1] * CH / peak).toFixed(1);
    last = p[1];
  });
  d += " L " + (LEFT + span * scale).toFixed(1) + " " + (AXIS + CH) + " Z";
  cs.appendChild(svgEl("path", { "class": "conc", d: d }));
  var peakLabel = svgEl("text", { x: 4, y: AXIS + 10, "class": "axis" });
  peakLabel.textContent = String(peak);
  cs.appendChild(peakLabel);
  document.getElementById("concurrency").appendChild(cs);

  // -- the step table: filter, sort, virtualized rows -------------------------------------------
  var columns = [
    ["name", "step", function (s) { return s.name; }],
    ["status", "status", function (s) { return s.status; }],
    ["start", "start", function (s) { return s.start_offset; }],
    ["duration", "duration", function (s) { return s.duration_seconds; }],
    ["attempts", "attempts", function (s) { return s.attempts; }],
    ["executor", "executor", function (s) { return s.executor || ""; }],
    ["cache", "cache", function (s) { return s.cache_policy || ""; }],
    ["saved", "saved", function (s) { return s.time_saved_seconds; }],
    ["error", "error", errorText]
  ];
  var head = document.getElementById("table-head");
  columns.forEach(function (c, i) {
    var h = el("span", { role: "columnheader", "data-col": i }, c[1]);
    head.appendChild(h);
  });
  var statusSelect = document.getElementById("status-filter");
  Object.keys(data.counts).forEach(function (st) { statusSelect.appendChild(el("option", { value: st }, st)); });
  var body = document.getElementById("table-body"), spacer = document.getElementById("table-spacer");
  var ROW = 24, view = steps.slice(), sortCol = -1, sortDir = 1, selected = null, shown = {};
  var haystack = steps.map(function (s) {
    return (s.name + " " + s.status + " " + (s.executor || "") + " " + errorText(s)).toLowerCase();
  });

  function apply() {
    var q = document.getElementById("filter").value.trim().toLowerCase();
    var st = statusSelect.value;
    view = steps.filter(function (s) {
      return (!st || s.status === st) && (!q || haystack[s._i].indexOf(q) >= 0);
    });
    if (sortCol >= 0) {
      var key = columns[sortCol][2];
      view.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === y) return a._i - b._i;
        if (x === null || x === undefined) return 1;
        if (y === null || y === undefined) return -1;
        return (x < y ? -1 : 1) * sortDir;
      });
    }
    document.getElementById("row-count").textContent = "showing " + view.length + " of " + steps.length + " steps";
    spacer.style.height = view.length * ROW + "px";
    body.style.height = Math.min(480, Math.max(3, view.length) * ROW + 2) + "px";
    for (var k in shown) { shown[k].remove(); }
    shown = {};
    draw();
  }
  function rowFor(s, index) {
    var row = el("div", { "class": "row" + (s.name === selected ? " selected" : ""), role: "row", "data-step": s.name });
    row.style.top = index * ROW + "px";
    row.appendChild(el("span", { title: s.name }, s.name));
    var st = el("span"); st.appendChild(el("span", { "class": "status st-" + s.status }, s.status)); row.appendChild(st);
    row.appendChild(el("span", {}, secs(s.start_offset)));
    row.appendChild(el("span", {}, secs(s.duration_seconds)));
    row.appendChild(el("span", {}, s.attempts));
    row.appendChild(el("span", {}, s.executor || "–"));
    row.appendChild(el("span", {}, s.cache_policy || "–"));
    row.appendChild(el("span", {}, s.status === "cached" ? (s.time_saved_seconds === null ? "unknown" : secs(s.time_saved_seconds)) : "–"));
    var err = errorText(s);
    row.appendChild(el("span", { title: err }, err));
    return row;
  }
  function draw() {
    var first = Math.max(0, Math.floor(body.scrollTop / ROW) - 10);
    var last = Math.min(view.length, Math.ceil((body.scrollTop + body.clientHeight) / ROW) + 10);
    var want = {};
    for (var i = first; i < last; i++) want[i] = true;
    for (var k in shown) if (!want[k]) { shown[k].remove(); delete shown[k]; }
    for (var j = first; j < last; j++) {
      if (!shown[j]) { shown[j] = rowFor(view[j], j); body.appendChild(shown[j]); }
    }
  }
  body.addEventListener("scroll", draw);
  document.getElementById("filter").addEventListener("input", apply);
  statusSelect.addEventListener("change", apply);
  head.addEventListener("click", function (ev) {
    var col = ev.target.getAttribute("data-col");
    if (col === null) return;
    col = Number(col);
    sortDir = sortCol === col ? -sortDir : 1;
    sortCol = col;
    Array.prototype.forEach.call(head.children, function (h) { h.removeAttribute("data-dir"); });
    ev.target.setAttribute("data-dir", sortDir > 0 ? "asc" : "desc");
    apply();
  });
  body.addEventListener("click", function (ev) {
    var row = ev.target.closest(".row");
    if (row) select(row.getAttribute("data-step"), false);
  });

  // -- one step's detail ------------------------------------------------------------------------
  function kv(table, key, value) {
    var tr = el("tr");
    tr.appendChild(el("th", {}, key));
    var td = el("td");
    if (value instanceof Node) td.appendChild(value); else td.textContent = value === null || value === undefined ? "–" : String(value);
    tr.appendChild(td);
    table.appendChild(tr);
  }
  function select(name, scrollTo) {
    var s = byName[name];
    if (!s) return;
    selected = name;
    var detail = document.getElementById("detail");
    detail.textContent = "";
    var box = el("div", { "class": "box", id: "detail-box" });
    box.appendChild(el("h3", {}, s.name));
    var t = el("table");
    kv(t, "status", s.status + (s.skip_reason ? " (" + s.skip_reason + ")" : ""));
    kv(t, "start / end", secs(s.start_offset) + " → " + secs(s.end_offset) + " (" + secs(s.duration_seconds) + ")");
    kv(t, "attempts", s.attempts);
    if (s.items) {
      kv(t, "items", s.items.total + " (" + itemCounts(s.items.counts) + ")");
      kv(t, "items per second", s.items.per_second === null ? "–" : String(s.items.per_second));
    }
    kv(t, "executor", s.executor);
    kv(t, "cache", (s.cache_policy || "–") + (s.cache_key ? " · key " + s.cache_key : ""));
    if (s.cache_reason) kv(t, "cache reason", s.cache_reason);
    if (s.status === "cached") kv(t, "time saved", s.time_saved_seconds === null ? "unknown" : secs(s.time_saved_seconds));
    kv(t, "resources", Object.keys(s.resources).length ? JSON.stringify(s.resources) : "none");
    if (s.group) kv(t, "execution group", s.group);
    if (s.fallback_reasons.length) kv(t, "fallback used", s.fallback_reasons.join("; "));
    s.inputs.forEach(function (p) {
      var where = p.from === "step" ? "from " + p.step + "." + p.output : p.from === "context" ? "context " + p.name + " = " + p.value : "default " + p.value;
      kv(t, "input " + p.parameter, where + " · " + (p.type || "?") + (p.size ? " · " + bytes(p.size) : ""));
    });
    s.outputs.forEach(function (o) { kv(t, "output " + o.name, (o.type || "?") + " · " + bytes(o.size)); });
    box.appendChild(t);
    s.errors.forEach(function (e) {
      box.appendChild(el("h4", {}, "attempt " + e.attempt + ": " + e.type + ": " + e.message));
      if (e.traceback) box.appendChild(el("pre", {}, e.traceback));
    });
    if (s.attempts > 1 && !s.earlier_attempt_errors_recorded) {
      box.appendChild(el("p", { "class": "note" }, "Errors of the " + (s.attempts - 1) + " earlier attempt(s) are not recorded."));
    }
    detail.appendChild(box);
    Array.prototype.forEach.call(document.querySelectorAll("#dag-svg .node.selected"), function (n) { n.classList.remove("selected"); });
    Array.prototype.forEach.call(document.querySelectorAll("#dag-svg .node"), function (n) {
      if (n.getAttribute("data-step") === name) n.classList.add("selected");
    });
    if (scrollTo) {
      var at = view.indexOf(s);
      if (at >= 0) body.scrollTop = Math.max(0, at * ROW - body.clientHeight / 2);
    }
    for (var k in shown) shown[k].classList.toggle("selected", shown[k].getAttribute("data-step") === name);
  }
  var dagSvg = document.getElementById("dag-svg");
  if (dagSvg) {
    // Fit a drawing up to 2.5 times the box's width; a wider one keeps its size, centred.
    var box = document.getElementById("dag"), natural = Number(dagSvg.getAttribute("width"));
    var fit = document.getElementById("dag-fit");
    var fitted = false;
    var setFit = function (on) {
      fitted = on;
      dagSvg.style.width = on ? "100%" : natural + "px";
      dagSvg.style.height = "auto";
      fit.textContent = on ? "actual size" : "fit to width";
      if (!on) box.scrollLeft = Math.max(0, (box.scrollWidth - box.clientWidth) / 2);
    };
    fit.hidden = false;
    fit.addEventListener("click", function () { setFit(!fitted); });
    setFit(natural <= 2.5 * box.clientWidth);
  }
  if (dagSvg) dagSvg.addEventListener("click", function (ev) {
    var g = ev.target.closest(".node");
    if (g) select(g.getAttribute("data-step"), true);
  });
  apply();
  document.body.setAttribute("data-ready", "1");
})();
