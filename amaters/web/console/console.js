// The amaters operator console: reads this server's /admin/ API, /health, /readyz and /metrics.
// It decides nothing itself: every figure and every refusal (401, 403) is the server's answer.
// The credential (JWT or API key) lives in sessionStorage and goes out as a header; no cookies.
"use strict";

(function () {
  const POLL_MS = 2000;
  const ADMIN_EVERY = 5;  // admin reads every 10 s
  const WINDOW_S = 300;
  const CREDENTIAL = "amaters.console.credential";
  const $ = (id) => document.getElementById(id);

  // -- formatting: every figure carries its unit; times in the browser's time zone -------------
  const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
  const fmtNumber = (n) => (n === null || n === undefined || Number.isNaN(n) ? "–" : numberFormat.format(n));
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${numberFormat.format(n)} ${units[i]}`;
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.floor(seconds);
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d} d ${h} h ${m} min`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${s % 60} s`;
    return `${s} s`;
  }
  const fmtTime = (value) => {
    if (value === null || value === undefined || value === "") return "–";
    const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
    return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
  };

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function fillRows(tbody, rows) {
    tbody.replaceChildren(...rows.map((cells) => el("tr", {}, ...cells.map((c) => {
      if (c instanceof Node && c.tagName === "TD") return c;
      return el("td", {}, c);
    }))));
  }
  function fillKv(dl, pairs) {
    dl.replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  // -- the server's API ------------------------------------------------------------------------
  function credential() {
    try { return JSON.parse(sessionStorage.getItem(CREDENTIAL) || "null"); } catch (e) { return null; }
  }
  function headers() {
    // The console is served by the server it talks to (same origin), so it may send the header
    // the admin API asks for while auth is off; a page from another site cannot (no CORS on /admin).
    const found = { "X-Amaters-Admin": "1" };
    const c = credential();
    if (c) found.Authorization = (c.kind === "apikey" ? "ApiKey " : "Bearer ") + c.secret;
    return found;
  }
  async function api(path, method) {
    let response;
    try {
      response = await fetch(path, { method: method || "GET", headers: headers(), credentials: "omit", cache: "no-store" });
    } catch (e) {
      return { status: 0, body: { message: "the server did not answer" } };
    }
    const text = await response.text();
    let body = text;
    if ((response.headers.get("content-type") || "").includes("json")) {
      try { body = JSON.parse(text); } catch (e) { body = { message: text }; }
    }
    if (response.status === 401 && path.startsWith("/admin/")) signedOut(body);
    return { status: response.status, body };
  }
  function problem(result) {
    const body = result.body || {};
    const what = result.status === 403 ? "Forbidden" : result.status === 0 ? "Unreachable" : "Error";
    return `${what} (${result.status || "no answer"}): ${body.message || body.error || "request failed"}`;
  }
  function showError(id, result) { $(id).textContent = result ? problem(result) : ""; }

  // -- signing in and out ----------------------------------------------------------------------
  let signedIn = false;
  function signedOut(body) {
    const had = credential() !== null;
    sessionStorage.removeItem(CREDENTIAL);
    signedIn = false;
    stopPolling();
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
    clearData();
    $("nav").hidden = true;
    $("signout").hidden = true;
    $("login").hidden = false;
    $("hdr-state").textContent = "Sign in to see this server.";
    $("login-error").textContent = had ? `The server refused these credentials: ${(body && body.message) || "401"}` : "";
    $("login-secret").focus();
  }
  function clearData() {
    for (const tbody of document.querySelectorAll("tbody")) tbody.replaceChildren();
    for (const dl of document.querySelectorAll("dl")) dl.replaceChildren();
    for (const id of ["ov-ready", "ov-version", "ov-uptime", "ov-requests"]) $(id).textContent = "…";
    $("ov-reasons").replaceChildren();
    $("charts").replaceChildren();
    charts.clear();
  }
  async function start() {
    $("login").hidden = true;
    $("banner").hidden = true;
    const first = await api("/admin/status");
    if (first.status === 401) return;
    if (first.status === 0) {
      $("banner").textContent = problem(first);
      $("banner").hidden = false;
      setTimeout(start, POLL_MS);
      return;
    }
    signedIn = true;
    $("nav").hidden = false;
    $("signout").hidden = credential() === null;
    showView(currentView(), false);
    if (first.status === 200) loadCluster();
    poll(first);
  }
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const secret = $("login-secret").value.trim();
    if (!secret) return;
    sessionStorage.setItem(CREDENTIAL, JSON.stringify({ kind: $("login-kind").value, secret }));
    $("login-secret").value = "";
    $("login-error").textContent = "";
    start();
  });
  $("signout").addEventListener("click", () => signedOut(null));

  // -- views -----------------------------------------------------------------------------------
  const VIEWS = ["overview", "charts", "collections", "snapshots", "config", "audit", "cluster", "fhe"];
  function currentView() {
    const name = location.hash.replace("#", "");
    return VIEWS.includes(name) ? name : "overview";
  }
  function showView(name, focus) {
    if (!signedIn) return;
    for (const view of VIEWS) $(`view-${view}`).hidden = view !== name;
    for (const link of document.querySelectorAll("nav a")) {
      if (link.dataset.view === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (focus) $(`${name}-h`).focus();
    refreshView(name);
  }
  window.addEventListener("hashchange", () => showView(currentView(), true));

  async function refreshView(name) {
    if (name === "overview") return loadResources();
    if (name === "collections") return loadCollections();
    if (name === "snapshots") return loadSnapshots();
    if (name === "config") return loadConfig();
    if (name === "audit") return loadAudit();
    if (name === "cluster") return loadCluster();
    if (name === "charts") return drawCharts();
    return undefined;
  }

  // -- overview --------------------------------------------------------------------------------
  let lastStatus = null;
  function renderStatus(result) {
    if (result.status !== 200) {
      showError("overview-error", result);
      return;
    }
    showError("overview-error", null);
    const s = result.body;
    lastStatus = s;
    $("ov-version").textContent = s.version;
    $("ov-uptime").textContent = fmtDuration(s.uptime_seconds);
    fillKv($("ov-server"), [
      ["State", s.state],
      ["Storage backend", s.backend],
      ["Sync mode", s.sync],
      ["Native connections open", `${fmtNumber(s.connections)} connection${s.connections === 1 ? "" : "s"}`],
      ["Authentication", s.auth_enabled ? "on" : "off (loopback only)"],
      ["Configuration file", s.config_file || "none (defaults and overrides)"],
      ["Last reload", s.last_reload ? (s.last_reload.ok ? "succeeded" : "failed") : "none since start"],
    ]);
    // FHE: shown only once the server's status reports it.
    $("nav-fhe").hidden = !s.fhe;
    if (s.fhe) renderReported($("fhe-body"), s.fhe);
  }
  // What the server reported, as it reported it: scalars as text, lists and objects as JSON.
  function renderReported(dl, data) {
    fillKv(dl, Object.entries(data).map(([k, v]) => [k,
      v !== null && typeof v === "object" ? el("pre", {}, JSON.stringify(v, null, 2)) : String(v)]));
  }
  function table(caption, headings, rows) {
    const t = el("table", {}, el("caption", { class: "sr-only" }, caption),
      el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", { scope: "col" }, h)))), el("tbody"));
    fillRows(t.tBodies[0], rows);
    return t;
  }
  const yesNo = (v) => el("td", { class: v ? "ok" : "bad" }, v ? "yes" : "no");
  function renderCluster(c) {
    const { nodes, shards, ...rest } = c;
    renderReported($("cluster-body"), rest);
    const parts = [];
    if (Array.isArray(nodes)) {
      parts.push(el("h3", {}, "Nodes"), table("Nodes", ["Node", "Address", "Leader", "Version", "Registered"],
        nodes.map((n) => [n.name, el("code", {}, n.advertise), yesNo(n.leader), n.version, fmtTime(n.registered_at)])));
    }
    for (const shard of Array.isArray(shards) ? shards : []) {
      parts.push(el("h3", {}, `Shard ${shard.name}: ${shard.healthy ? "healthy" : "unhealthy"}, leader ${shard.leader || "none"}`),
        table(`Members of shard ${shard.name}`, ["etcd member", "Leader", "Reachable", "Raft term", "Database size", "Version"],
          (shard.members || []).map((m) => [el("code", {}, m.endpoint), yesNo(m.leader), yesNo(m.reachable),
            fmtNumber(m.raft_term), fmtBytes(m.db_size), m.version || "–"])));
    }
    $("cluster-tables").replaceChildren(...parts);
  }
  // Clustered mode: /admin/cluster answers 200 on a clustered node (409 on a single node: no view).
  async function loadCluster() {
    const r = await api("/admin/cluster");
    $("nav-cluster").hidden = r.status !== 200;
    if (r.status === 200) {
      showError("cluster-error", null);
      renderCluster(r.body);
    } else if (currentView() === "cluster") {
      showError("cluster-error", r);
    }
  }
  function renderHealth(health, ready) {
    const readyNow = ready.status === 200;
    const state = $("ov-ready");
    state.textContent = readyNow ? "ready" : "not ready";
    state.className = `big ${readyNow ? "ok" : "bad"}`;
    const reasons = [];
    if (!readyNow && ready.body && ready.body.reason) reasons.push(`reason: ${ready.body.reason}`);
    const components = (health.body && health.body.components) || {};
    for (const [name, c] of Object.entries(components)) {
      if (c.status !== "healthy") reasons.push(`${name}: ${c.status} (${c.message})`);
    }
    $("ov-reasons").replaceChildren(...reasons.map((r) => el("li", {}, r)));
    fillRows($("ov-components").tBodies[0], Object.entries(components).map(([name, c]) => [
      name, el("td", { class: c.status === "healthy" ? "ok" : c.status === "degraded" ? "warn" : "bad" }, c.status), c.message,
    ]));
    const hs = health.body || {};
    $("hdr-state").textContent = `${readyNow ? "Ready" : "Not ready"} · ${hs.status || "unknown"} · version ${hs.version || "?"}`;
    if (hs.uptime_seconds !== undefined) $("ov-uptime").textContent = fmtDuration(hs.uptime_seconds);
    if (!lastStatus && hs.version) $("ov-version").textContent = hs.version;
  }
  async function loadResources() {
    const r = await api("/admin/resources");
    if (r.status !== 200) { showError("resources-error", r); return; }
    showError("resources-error", null);
    const d = r.body.data_dir;
    const pairs = [["Path", el("code", {}, d.path)], ["Used by amaters", `${fmtBytes(d.bytes)} in ${fmtNumber(d.files)} files`]];
    if (d.filesystem_bytes !== undefined) {
      const usedPct = 100 * (1 - d.filesystem_free_bytes / d.filesystem_bytes);
      pairs.push(["File system", `${fmtBytes(d.filesystem_free_bytes)} free of ${fmtBytes(d.filesystem_bytes)} (${fmtNumber(usedPct)} % used)`]);
    }
    fillKv($("ov-datadir"), pairs);
    const certs = r.body.tls.certificates;
    if (!r.body.tls.enabled && !certs.length) {
      fillRows($("ov-certs").tBodies[0], [[el("td", { colspan: "5" }, "TLS is off (tls.enabled = false)")]]);
      return;
    }
    fillRows($("ov-certs").tBodies[0], certs.map((c) => {
      if (c.error) return [c.use, el("td", { colspan: "4", class: "bad" }, c.error)];
      const days = (c.not_after_epoch - Date.now() / 1000) / 86400;
      return [c.use, el("code", {}, c.subject), el("code", {}, c.issuer), fmtTime(c.not_after),
        el("td", { class: days < 14 ? "bad" : days < 30 ? "warn" : "ok" }, `${Math.floor(days)} days`)];
    }));
  }

  // -- metrics ---------------------------------------------------------------------------------
  // Prometheus text → {name: [{labels, value}]}.
  function parseMetrics(text) {
    const out = {};
    const re = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
    const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const m = re.exec(line);
      if (!m) continue;
      const labels = {};
      if (m[2]) for (const lm of m[2].matchAll(labelRe)) labels[lm[1]] = lm[2];
      (out[m[1]] = out[m[1]] || []).push({ labels, value: parseFloat(m[3]) });
    }
    return out;
  }
  const sumBy = (samples, label) => {
    const totals = {};
    for (const s of samples || []) {
      const key = label ? s.labels[label] : "";
      totals[key] = (totals[key] || 0) + s.value;
    }
    return totals;
  };
  const total = (samples) => (samples || []).reduce((a, s) => a + s.value, 0);
  function bucketsOf(samples) {
    const byLe = {};
    for (const s of samples || []) byLe[s.labels.le] = (byLe[s.labels.le] || 0) + s.value;
    return Object.entries(byLe).map(([le, v]) => [le === "+Inf" ? Infinity : parseFloat(le), v]).sort((a, b) => a[0] - b[0]);
  }
  // histogram_quantile over the increase of cumulative buckets between two scrapes.
  function quantile(q, prev, cur) {
    const p = new Map(prev.map(([le, v]) => [le, v]));
    const inc = cur.map(([le, v]) => [le, v - (p.get(le) || 0)]);
    const count = inc.length ? inc[inc.length - 1][1] : 0;
    if (count <= 0) return null;
    const rank = q * count;
    let lowerLe = 0, lowerCount = 0;
    for (const [le, c] of inc) {
      if (c >= rank) {
        if (le === Infinity) return lowerLe;
        return lowerLe + (le - lowerLe) * ((rank - lowerCount) / Math.max(c - lowerCount, 1e-12));
      }
      lowerLe = le; lowerCount = c;
    }
    return lowerLe;
  }

  const history = { t: [], series: {} };  // series name → array aligned with history.t
  let previous = null;
  function record(chart, name, value) {
    const key = `${chart}\u0000${name}`;
    if (!history.series[key]) history.series[key] = new Array(history.t.length - 1).fill(null);
    history.series[key].push(value);
  }
  function sample(metrics, now) {
    const requests = sumBy(metrics.amaters_requests_total, "op");
    const errors = sumBy(metrics.amaters_errors_total, "code");
    const latency = bucketsOf(metrics.amaters_request_duration_seconds_bucket);
    const commits = { sum: total(metrics.amaters_storage_group_commit_size_sum), count: total(metrics.amaters_storage_group_commit_size_count) };
    const cache = sumBy(metrics.amaters_cache_requests_total, "result");
    const current = { now, requests, errors, latency, commits, cache };
    $("ov-requests").textContent = `${fmtNumber(Object.values(requests).reduce((a, b) => a + b, 0))} requests`;
    if (previous) {
      const dt = Math.max(now - previous.now, 1e-3);
      history.t.push(now);
      for (const key of Object.keys(history.series)) {
        if (history.series[key].length < history.t.length - 1) history.series[key].push(null);
      }
      for (const [op, n] of Object.entries(requests)) {
        const rate = (n - (previous.requests[op] || 0)) / dt;
        if (rate > 0 || history.series[`requests\u0000${op}`]) record("requests", op, rate);
      }
      record("requests", "all operations", Object.keys(requests).reduce((a, op) => a + (requests[op] - (previous.requests[op] || 0)), 0) / dt);
      for (const [code, n] of Object.entries(errors)) {
        const rate = (n - (previous.errors[code] || 0)) / dt;
        if (rate > 0 || history.series[`errors\u0000${code}`]) record("errors", code, rate);
      }
      record("errors", "all codes", Object.keys(errors).reduce((a, c) => a + (errors[c] - (previous.errors[c] || 0)), 0) / dt);
      const p50 = quantile(0.5, previous.latency, latency), p99 = quantile(0.99, previous.latency, latency);
      record("latency", "p50", p50 === null ? null : p50 * 1000);
      record("latency", "p99", p99 === null ? null : p99 * 1000);
      const fsyncs = commits.count - previous.commits.count;
      record("fsync", "writes per fsync", fsyncs > 0 ? (commits.sum - previous.commits.sum) / fsyncs : null);
      const hits = (cache.hit || 0) - (previous.cache.hit || 0), misses = (cache.miss || 0) - (previous.cache.miss || 0);
      record("cache", "hit rate", hits + misses > 0 ? (100 * hits) / (hits + misses) : null);
      record("connections", "open", total(metrics.amaters_connections_active));
      const lag = total(metrics.amaters_reactor_lag_seconds);
      record("lag", "reactor lag", lag * 1000);
      for (const key of Object.keys(history.series)) {
        if (history.series[key].length < history.t.length) history.series[key].push(null);
      }
      while (history.t.length && history.t[0] < now - WINDOW_S) {
        history.t.shift();
        for (const key of Object.keys(history.series)) history.series[key].shift();
      }
    }
    previous = current;
  }

  const CHARTS = [
    ["requests", "Requests per second by operation", "req/s"],
    ["latency", "Request latency (p50, p99)", "ms"],
    ["errors", "Errors per second by code", "errors/s"],
    ["fsync", "Group commit: writes per fsync", "writes/fsync"],
    ["cache", "Query cache hit rate", "%"],
    ["connections", "Native connections open", "connections"],
    ["lag", "Reactor lag", "ms"],
  ];
  const COLORS = ["#0b5cad", "#c2410c", "#15803d", "#7e22ce", "#a40e26", "#0e7490", "#a16207", "#be185d", "#4d7c0f", "#334155"];
  const charts = new Map();  // chart id → {plot, names}
  function drawCharts() {
    if ($("view-charts").hidden || typeof uPlot === "undefined") return;
    const container = $("charts");
    for (const [id, title, unit] of CHARTS) {
      const names = Object.keys(history.series).filter((k) => k.startsWith(`${id}\u0000`)).map((k) => k.split("\u0000")[1]);
      const data = [history.t, ...names.map((n) => history.series[`${id}\u0000${n}`])];
      let entry = charts.get(id);
      if (!entry) {
        const latest = el("span", { class: "latest", id: `latest-${id}` });
        const holder = el("div", { class: "plot" });
        const figure = el("figure", { class: "chart", id: `chart-${id}`, "aria-labelledby": `cap-${id}` },
          el("figcaption", { id: `cap-${id}` }, `${title} (${unit}) `, latest), holder);
        container.append(figure);
        entry = { figure, holder, plot: null, names: null };
        charts.set(id, entry);
      }
      const lastValues = names.map((n) => {
        const values = history.series[`${id}\u0000${n}`];
        return `${n}: ${fmtNumber(values[values.length - 1])} ${unit}`;
      });
      $(`latest-${id}`).textContent = lastValues.length ? `· latest ${lastValues.join(", ")}` : "· waiting for a second sample";
      if (!names.length) continue;
      if (!entry.plot || entry.names.join("|") !== names.join("|")) {
        if (entry.plot) entry.plot.destroy();
        entry.names = names;
        const width = Math.max(320, entry.figure.clientWidth - 16);
        entry.plot = new uPlot({
          width, height: 220,
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
          legend: { live: false },
          axes: [
            { space: 70, values: (u, splits) => splits.map((v) => new Date(v * 1000).toLocaleTimeString()) },
            { label: unit, size: 60 },
          ],
          series: [{ label: "time" }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: false }))],
        }, data, entry.holder);
      } else {
        entry.plot.setData(data);
      }
    }
  }

  // -- collections, snapshots, configuration, audit ------------------------------------------------
  async function loadCollections() {
    const r = await api("/admin/collections");
    const tbody = $("collections-table").tBodies[0];
    if (r.status !== 200) { showError("collections-error", r); tbody.replaceChildren(); $("collections-table").hidden = true; return; }
    showError("collections-error", null);
    const list = r.body.collections;
    $("collections-empty").hidden = list.length > 0;
    $("collections-table").hidden = list.length === 0;
    fillRows(tbody, list.map((c) => [el("code", {}, c.name),
      el("td", { class: "num" }, `${fmtNumber(c.keys)} keys`), el("td", { class: "num" }, fmtBytes(c.bytes))]));
  }

  async function loadSnapshots() {
    const r = await api("/admin/snapshots");
    const tbody = $("snapshots-table").tBodies[0];
    if (r.status !== 200) { showError("snapshots-error", r); tbody.replaceChildren(); $("snapshots-table").hidden = true; return; }
    showError("snapshots-error", null);
    const list = r.body.snapshots || [];
    $("snapshots-empty").hidden = list.length > 0;
    $("snapshots-table").hidden = list.length === 0;
    fillRows(tbody, list.slice().reverse().map((s) => {
      const manifest = s.manifest || {};
      const verify = el("button", { type: "button", class: "secondary", "aria-label": `Verify ${s.name}` }, "Verify");
      const result = el("span", { role: "status" }, s.problem ? ` unreadable: ${s.problem}` : "");
      verify.addEventListener("click", async () => {
        verify.disabled = true;
        result.textContent = " verifying…";
        const v = await api(`/admin/snapshots/${encodeURIComponent(s.name)}/verify`, "POST");
        verify.disabled = false;
        if (v.status !== 200) result.textContent = ` ${problem(v)}`;
        else result.textContent = v.body.ok ? ` OK: ${fmtNumber(v.body.manifest.files.length)} files intact` : ` damaged: ${v.body.error}`;
        result.className = v.status === 200 && v.body.ok ? "ok" : "bad";
      });
      const keys = Array.isArray(manifest.collections) ? manifest.collections.reduce((a, c) => a + c.keys, 0) : null;
      return [el("code", {}, s.name), fmtTime(manifest.created_at), el("td", { class: "num" }, fmtBytes(s.size)),
        el("td", { class: "num" }, keys === null ? "–" : `${fmtNumber(keys)} keys`), el("td", {}, verify, result)];
    }));
  }
  $("snapshot-create").addEventListener("click", async () => {
    const button = $("snapshot-create");
    button.disabled = true;
    $("snapshots-status").textContent = "Creating a snapshot…";
    const r = await api("/admin/snapshots", "POST");
    button.disabled = false;
    if (r.status !== 200) {
      $("snapshots-status").textContent = "";
      showError("snapshots-error", r);
      return;
    }
    showError("snapshots-error", null);
    $("snapshots-status").textContent = `Created ${r.body.name}: ${fmtBytes(r.body.size)}, ${fmtNumber(r.body.keys)} keys.`;
    loadSnapshots();
  });

  function flatten(prefix, value, out) {
    if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
      for (const [k, v] of Object.entries(value)) flatten(prefix ? `${prefix}.${k}` : k, v, out);
    } else {
      out.push([prefix, JSON.stringify(value)]);
    }
    return out;
  }
  function renderPreview(preview) {
    const box = $("config-preview");
    if (!preview.ok) {
      box.replaceChildren(el("p", { class: "bad" }, "The configuration on disk is invalid; a reload would be refused:"),
        el("ul", {}, ...preview.errors.map((e) => el("li", {}, e))));
      return;
    }
    const rows = [
      ...preview.reloadable.map((c) => [c, "applied by a reload"]),
      ...preview.need_restart.map((c) => [c, "needs a restart"]),
    ];
    if (!rows.length) {
      box.replaceChildren(el("p", {}, "Nothing: the sources read the same as the configuration in effect (files that settings point at, such as certificates and keys, are re-read by every reload)."));
      return;
    }
    const table = el("table", {}, el("caption", { class: "sr-only" }, "Pending changes"),
      el("thead", {}, el("tr", {}, ...["Setting", "In effect", "On disk", "Effect"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody"));
    fillRows(table.tBodies[0], rows.map(([c, how]) => [el("code", {}, c.key), el("code", {}, JSON.stringify(c.current)),
      el("code", {}, JSON.stringify(c.new)), el("td", { class: how.startsWith("needs") ? "warn" : "" }, how)]));
    box.replaceChildren(table);
  }
  async function loadConfig() {
    const r = await api("/admin/config");
    if (r.status !== 200) { showError("config-error", r); return; }
    showError("config-error", null);
    $("config-file").textContent = `Configuration file: ${r.body.config_file || "none (defaults, environment and --set)"}`;
    renderPreview(r.body.reload_preview);
    fillRows($("config-table").tBodies[0], flatten("", r.body.config, []).map(([k, v]) => [el("code", {}, k), el("code", {}, v)]));
  }
  $("config-reload").addEventListener("click", async () => {
    const button = $("config-reload");
    button.disabled = true;
    $("config-status").textContent = "Reloading…";
    const r = await api("/admin/reload", "POST");
    button.disabled = false;
    if (r.status !== 200) { $("config-status").textContent = ""; showError("config-error", r); return; }
    const b = r.body;
    $("config-status").textContent = b.ok
      ? `Reloaded: ${b.applied.length ? `changed ${b.applied.join(", ")}` : "no setting changed"}${b.need_restart.length ? `; needs a restart: ${b.need_restart.join(", ")}` : ""}.`
      : `Reload refused, nothing changed: ${b.errors.join("; ")}`;
    loadConfig();
  });

  async function loadAudit() {
    const r = await api("/admin/audit?limit=100");
    const tbody = $("audit-table").tBodies[0];
    if (r.status !== 200) { showError("audit-error", r); tbody.replaceChildren(); $("audit-table").hidden = true; return; }
    showError("audit-error", null);
    const events = r.body.events.slice().reverse();
    const empty = $("audit-empty");
    empty.hidden = events.length > 0;
    empty.textContent = r.body.enabled ? "No audit events yet." : "The audit log is off (audit.enabled = false).";
    $("audit-table").hidden = events.length === 0;
    fillRows(tbody, events.map((e) => [fmtTime(e.timestamp), e.event_type, e.principal || "–", e.action || "–",
      e.resource || "–", el("td", { class: e.result === "success" ? "ok" : "bad" }, e.result)]));
  }

  // -- polling ---------------------------------------------------------------------------------
  let timer = null;
  let ticks = 0;
  function stopPolling() { if (timer) clearTimeout(timer); timer = null; }
  async function poll(status) {
    stopPolling();
    if (!signedIn) return;
    // Public probes and metrics every tick; admin reads (each one an audited admin operation)
    // only every ADMIN_EVERY ticks, and only what the open view shows.
    const adminTick = ticks % ADMIN_EVERY === 0;
    const [st, health, ready, metrics] = await Promise.all([
      status ? Promise.resolve(status) : adminTick ? api("/admin/status") : Promise.resolve(null),
      api("/health"), api("/readyz"), api("/metrics"),
    ]);
    if (!signedIn) return;
    if (st) renderStatus(st);
    renderHealth(health, ready);
    if (metrics.status === 200 && typeof metrics.body === "string") {
      showError("charts-error", null);
      sample(parseMetrics(metrics.body), Date.now() / 1000);
    } else {
      showError("charts-error", metrics);
    }
    const view = currentView();
    if (view === "charts") drawCharts();
    // The view's own data was read when it opened; refresh it on the next admin ticks.
    else if (adminTick && ticks > 0 && view !== "config") await refreshView(view);
    ticks++;
    if (signedIn) timer = setTimeout(() => poll(null), POLL_MS);
  }

  $("tz").textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "your local time zone";
  $("poll-seconds").textContent = String(POLL_MS / 1000);
  $("window-minutes").textContent = String(WINDOW_S / 60);
  start();
})();
