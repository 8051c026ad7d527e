/* The dspex console's page scripts: a run's live chart and events (SSE), a job followed live (SSE), the usage
   chart. No inline script anywhere (the pages' Content-Security-Policy forbids it): data comes from data-*
   attributes and <script type="application/json"> blocks; text goes into the DOM as textContent only. */
(function () {
  "use strict";

  var END_STAGES = ["done", "failed", "cancelled"];
  var STATUS_OF = {done: "succeeded", failed: "failed", cancelled: "cancelled"};

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function when(ts) {
    if (typeof ts !== "number") return "-";
    return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19);
  }

  function num(v, digits) {
    if (typeof v !== "number") return "-";
    return Number.isInteger(v) && digits === undefined ? v.toLocaleString("en-US") : v.toFixed(digits || 3);
  }

  function readJSON(id) {
    var node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  /* -- a run: chart of stage progress and scores over time, fed by the run's event stream -------------------- */
  function initRun() {
    var canvas = document.getElementById("run-chart");
    if (!canvas || typeof Chart === "undefined") return;
    var events = readJSON("run-events-data") || [];
    var t0 = events.length ? events[0].ts : null;
    var progress = [], scores = [];

    function add(e) {
      if (t0 === null) t0 = e.ts;
      var x = Math.round((e.ts - t0) * 100) / 100;
      var frac = e.total ? Math.min(1, e.done / e.total) : (e.done ? 1 : 0);
      progress.push({x: x, y: frac, stage: e.stage});
      if (typeof e.score === "number") scores.push({x: x, y: e.score, stage: e.stage});
    }
    events.forEach(add);

    var chart = new Chart(canvas, {
      type: "line",
      data: {datasets: [
        {label: "stage progress", data: progress, borderColor: "#7c8aa5", backgroundColor: "#7c8aa5",
         pointRadius: 2, borderWidth: 1.5},
        {label: "score", data: scores, borderColor: "#d9480f", backgroundColor: "#d9480f", pointRadius: 5,
         borderWidth: 2}
      ]},
      options: {
        animation: false, responsive: true, maintainAspectRatio: false,
        scales: {x: {type: "linear", title: {display: true, text: "seconds since queued"}},
                 y: {suggestedMin: 0, suggestedMax: 1, title: {display: true, text: "progress / score"}}},
        plugins: {tooltip: {callbacks: {label: function (ctx) {
          return ctx.dataset.label + " (" + ctx.raw.stage + "): " + ctx.raw.y.toFixed(3);
        }}}}
      }
    });

    var live = document.getElementById("run-live");
    var stage = document.getElementById("run-stage");
    var tbody = document.getElementById("run-events");
    function mark() {
      canvas.dataset.points = String(progress.length);
      canvas.dataset.scores = String(scores.length);
    }
    mark();
    if (canvas.dataset.ended === "true") return;

    function refreshSummary() {
      if (window.htmx) window.htmx.ajax("GET", canvas.dataset.summaryUrl, {target: "#run-summary", swap: "innerHTML"});
    }

    function row(e) {
      var tr = el("tr");
      tr.appendChild(el("td", "", when(e.ts)));
      tr.appendChild(el("td", "", e.stage));
      tr.appendChild(el("td", "r", num(e.done) + (e.total ? " / " + num(e.total) : "")));
      tr.appendChild(el("td", "r", typeof e.score === "number" ? e.score.toFixed(3) : "-"));
      tr.appendChild(el("td", "", e.message || ""));
      tbody.appendChild(tr);
    }

    var source = new EventSource(canvas.dataset.eventsUrl);
    source.onmessage = function (message) {
      var e = JSON.parse(message.data);
      add(e);
      chart.update("none");
      mark();
      row(e);
      stage.textContent = e.stage;
      if (typeof e.score === "number") refreshSummary();
      if (END_STAGES.indexOf(e.stage) >= 0) {
        source.close();
        canvas.dataset.ended = "true";
        live.textContent = "ended";
        var status = document.getElementById("run-status");
        status.textContent = STATUS_OF[e.stage];
        status.className = "status " + STATUS_OF[e.stage];
        var cancel = document.getElementById("cancel-run");
        if (cancel) cancel.closest("form").hidden = true;
        refreshSummary();
      }
    };
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) live.textContent = "disconnected: reload to follow again";
      else live.textContent = "reconnecting…";
    };
    source.onopen = function () { live.textContent = "following live…"; };
  }

  /* -- a job: tokens per output field, steps and tool calls, then the result -------------------------------- */
  function initJob() {
    var box = document.getElementById("job-live");
    if (!box) return;
    var tokens = document.getElementById("job-tokens");
    var steps = document.getElementById("job-steps");
    var state = document.getElementById("job-state");
    var fields = {};
    var count = 0;

    function setState(value) {
      state.textContent = value;
      state.className = "status " + String(value).toLowerCase();
    }

    function fieldBox(name) {
      if (!fields[name]) {
        if (!count) tokens.textContent = "";
        var wrap = el("div", "token-field");
        wrap.appendChild(el("h3", "", name));
        fields[name] = el("pre", "stream");
        fields[name].dataset.field = name;
        wrap.appendChild(fields[name]);
        tokens.appendChild(wrap);
      }
      return fields[name];
    }

    function step(text, cls) {
      steps.appendChild(el("li", cls || "", text));
      box.dataset.steps = String(steps.children.length);
    }

    var source = new EventSource(box.dataset.eventsUrl);
    function on(type, handle) {
      source.addEventListener(type, function (message) {
        if (message.data === undefined) return;  // a connection error (the "error" name is shared)
        handle(JSON.parse(message.data));
      });
    }
    on("status", function (e) { setState(e.state); });
    on("state", function (e) { setState(e.state); });
    on("token", function (e) {
      var pre = fieldBox(e.field);
      if (e.reset) pre.textContent = "";
      pre.textContent += e.chunk;
      count += 1;
      box.dataset.tokens = String(count);
    });
    on("step", function (e) {
      step((e.phase === "start" ? "▶ " : "■ ") + e.kind + " " + e.name + (e.error ? " failed: " + e.error : ""),
           e.phase);
    });
    on("tool", function (e) {
      if (e.phase === "start") step("🔧 " + e.name + "(" + JSON.stringify(e.arguments || {}) + ")", "tool");
      else step("↳ " + e.name + ": " + (e.error ? "error " + e.error : JSON.stringify(e.result)), "tool");
    });
    on("result", function (e) {
      source.close();
      var result = e.result || {};
      setState("SUCCESS");
      var outputs = document.getElementById("job-outputs");
      Object.keys(result.outputs || {}).forEach(function (name) {
        var value = result.outputs[name];
        var tr = el("tr");
        tr.appendChild(el("th", "", name));
        var td = el("td");
        td.appendChild(el("pre", "", typeof value === "string" ? value : JSON.stringify(value, null, 2)));
        tr.appendChild(td);
        outputs.appendChild(tr);
      });
      var usage = result.usage || {};
      document.getElementById("job-version").textContent = String(result.program_version);
      document.getElementById("job-tokens-total").textContent = num(usage.total_tokens);
      document.getElementById("job-cost").textContent = typeof usage.cost_usd === "number" ? usage.cost_usd.toFixed(6) : "-";
      document.getElementById("job-duration").textContent = num(result.duration_ms, 1);
      document.getElementById("job-json").textContent = JSON.stringify(result, null, 2);
      document.getElementById("job-result").hidden = false;
      var trace = document.getElementById("job-trace");
      (result.trace || []).forEach(function (call) {
        var li = el("li");
        li.appendChild(el("strong", "", call.predictor));
        [["inputs", call.inputs], ["outputs", call.outputs]].forEach(function (part) {
          var d = el("details");
          d.open = part[0] === "outputs";
          d.appendChild(el("summary", "", part[0]));
          d.appendChild(el("pre", "", JSON.stringify(part[1] || {}, null, 2)));
          li.appendChild(d);
        });
        trace.appendChild(li);
      });
      document.getElementById("job-trace-box").hidden = !(result.trace || []).length;
      box.dataset.done = "result";
    });
    on("error", function (e) {
      source.close();
      setState("FAILURE");
      var err = e.error || {};
      var p = document.getElementById("job-error");
      p.textContent = (err.type || "Error") + ": " + (err.message || "");
      p.hidden = false;
      box.dataset.done = "error";
    });
  }

  /* -- usage: tokens (bars) and cost (line) per program and model ------------------------------------------- */
  function initUsage() {
    var canvas = document.getElementById("usage-chart");
    var data = readJSON("usage-data");
    if (!canvas || !data || typeof Chart === "undefined") return;
    new Chart(canvas, {
      data: {labels: data.labels, datasets: [
        {type: "bar", label: "tokens", data: data.tokens, backgroundColor: "#7c8aa5", yAxisID: "y"},
        {type: "line", label: "cost (USD)", data: data.cost, borderColor: "#d9480f", backgroundColor: "#d9480f",
         yAxisID: "cost", pointRadius: 4}
      ]},
      options: {animation: false, responsive: true, maintainAspectRatio: false,
                scales: {y: {beginAtZero: true, title: {display: true, text: "tokens"}},
                         cost: {beginAtZero: true, position: "right", grid: {drawOnChartArea: false},
                                title: {display: true, text: "USD"}}}}
    });
    canvas.dataset.ready = "true";
  }

  /* -- usage over time: tokens per hour stacked per model (or program), the hour's cost as a line -------------- */
  function initUsageTime() {
    var canvas = document.getElementById("usage-time-chart");
    var data = readJSON("usage-time-data");
    if (!canvas || !data || typeof Chart === "undefined") return;
    var datasets = data.datasets.map(function (d) {
      return {type: "bar", label: d.label, data: d.data, backgroundColor: d.backgroundColor, stack: "tokens",
              yAxisID: "y"};
    });
    datasets.push({type: "line", label: "cost (USD)", data: data.cost, borderColor: "#d9480f",
                   backgroundColor: "#d9480f", yAxisID: "cost", pointRadius: 2, tension: 0.2});
    new Chart(canvas, {
      data: {labels: data.labels, datasets: datasets},
      options: {animation: false, responsive: true, maintainAspectRatio: false,
                scales: {x: {stacked: true, ticks: {autoSkip: true, maxRotation: 0}},
                         y: {stacked: true, beginAtZero: true, title: {display: true, text: "tokens"}},
                         cost: {beginAtZero: true, position: "right", grid: {drawOnChartArea: false},
                                title: {display: true, text: "USD"}}}}
    });
    canvas.dataset.ready = "true";
  }

  function start() { initRun(); initJob(); initUsage(); initUsageTime(); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
