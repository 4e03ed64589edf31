// gpuprovider dashboard: the live feed, task logs, search and charts. No build step.
// Everything a tenant wrote reaches the page as text (textContent), never as HTML.
(function () {
  "use strict";
  var body = document.body;
  var base = body.dataset.base || "/ui";

  function signedOut() {
    window.location.href = base + "/"; // the server says why, on its sign-in page
  }

  // The journal: each change the viewer may see refreshes the page's live part. The
  // page's live part (#live, data-refresh: its address) is fetched again at most
  // once per 150 ms and always after the last change: a busy provider's stream of
  // changes never starves the page nor costs a fetch per change, and a change that
  // comes while a fetch is running is fetched again after it.
  var refreshing = null;
  var running = false;
  var missed = false;
  function refresh() {
    if (refreshing) return;
    refreshing = setTimeout(fetchLive, 150);
  }
  function fetchLive() {
    refreshing = null;
    var live = document.getElementById("live");
    if (!live || !live.dataset.refresh) return;
    if (running) { missed = true; return; }
    running = true;
    htmx.ajax("GET", live.dataset.refresh, { target: "#live", select: "#live", swap: "outerHTML" })
      .then(fetched, fetched);
  }
  function fetched() {
    running = false;
    if (missed) { missed = false; refresh(); }
  }

  function follow(url) {
    var source = new EventSource(url);
    var opened = false;
    source.addEventListener("open", function () {
      if (opened) refresh(); // back after a break: catch up
      opened = true;
    });
    source.addEventListener("change", refresh);
    source.addEventListener("signedout", function () { source.close(); signedOut(); });
    source.addEventListener("dropped", function () {
      source.close();
      refresh();
      setTimeout(function () { follow(url); }, 1000);
    });
  }
  if (body.dataset.events) follow(body.dataset.events);

  // A task's log: follow it live, search the lines shown.
  var log = document.getElementById("log");
  var followBox = document.getElementById("log-follow");
  var status = document.getElementById("log-status");
  var search = document.getElementById("log-search");
  var matches = document.getElementById("log-matches");
  var LOG_MAX = 2 * 1024 * 1024; // characters kept on the page: the rest stays downloadable

  function append(text) {
    log.appendChild(document.createTextNode(text));
    var length = log.textContent.length;
    if (length > LOG_MAX) {
      log.textContent = log.textContent.slice(length - LOG_MAX);
      status.textContent = "older output trimmed: download it";
    }
    if (followBox && followBox.checked) log.scrollTop = log.scrollHeight;
    if (search && search.value) filter();
  }

  if (log && log.dataset.stream) {
    var stream = new EventSource(log.dataset.stream);
    stream.onmessage = function (e) { append(JSON.parse(e.data)); };
    stream.addEventListener("skipped", function (e) {
      append("\n[" + e.data + " bytes dropped by the log's cap]\n");
    });
    stream.addEventListener("end", function (e) {
      stream.close();
      status.textContent = "ended: " + JSON.parse(e.data);
      refresh();
    });
    stream.addEventListener("signedout", function () { stream.close(); signedOut(); });
    stream.addEventListener("error", function (e) {
      if (e.data) { status.textContent = JSON.parse(e.data); stream.close(); }
    });
  }
  if (log) log.scrollTop = log.scrollHeight;

  function filter() {
    var needle = search.value;
    if (!needle) { matches.hidden = true; log.hidden = false; return; }
    var lines = log.textContent.split("\n").filter(function (line) {
      return line.indexOf(needle) !== -1;
    });
    matches.textContent = lines.join("\n");
    status.textContent = lines.length + " matching lines";
    matches.hidden = false;
    log.hidden = true;
  }
  if (search) search.addEventListener("input", filter);

  // GPU history charts (uPlot): utilisation in %, memory used in GiB.
  document.querySelectorAll("figure.chart[data-src]").forEach(function (figure) {
    fetch(figure.dataset.src, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : { points: [] }; })
      .then(function (history) {
        var points = history.points || [];
        if (!points.length) {
          figure.appendChild(document.createTextNode(" — no samples yet"));
          return;
        }
        var data = [
          points.map(function (p) { return p.at; }),
          points.map(function (p) {
            return p.utilization_ratio == null ? null : p.utilization_ratio * 100;
          }),
          points.map(function (p) {
            return p.memory_used_bytes == null ? null : p.memory_used_bytes / 1073741824;
          }),
        ];
        new uPlot({
          title: figure.dataset.title,
          width: Math.min(560, figure.clientWidth || 560),
          height: 200,
          series: [
            {},
            { label: "utilisation", stroke: "#0b5cad", value: function (u, v) { return v == null ? "—" : v.toFixed(0) + " %"; }, scale: "%" },
            { label: "memory used", stroke: "#8a3b00", value: function (u, v) { return v == null ? "—" : v.toFixed(1) + " GiB"; }, scale: "GiB" },
          ],
          axes: [{}, { scale: "%", values: function (u, vs) { return vs.map(function (v) { return v + " %"; }); } },
                 { scale: "GiB", side: 1, values: function (u, vs) { return vs.map(function (v) { return v + " GiB"; }); } }],
          scales: { "%": { range: [0, 100] } },
        }, data, figure);
      });
  });
})();
