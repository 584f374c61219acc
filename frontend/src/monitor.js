// The live monitor pages: /monitor/ (staff: host + every environment) and
// /environments/<id>/monitor/ (one environment). Both poll GET /api/v1/monitor/
// every 2 s, keep the last few minutes in memory and draw them with uPlot.
//
// Exposes window.LSL.{uPlot, mountMonitor, formatBytes}; the page calls
// LSL.mountMonitor({mode: "host"}) or LSL.mountMonitor({mode: "environment", envId}) once.
// window.lslMonitor.samples counts successful polls (the browser tests wait on it).
import uPlot from "uplot";

const POLL_MS = 2000;
const WINDOW_SECONDS = 5 * 60;
const CHART_HEIGHT = 190;
const PALETTE = ["#2f6fde", "#1f8a4c", "#c93b3b", "#b7791f", "#7b4fd6", "#0f8b8d", "#d6477f", "#5a6072"];

// --- formatting ---------------------------------------------------------------------------

function formatBytes(n) {
  if (n == null || !Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  const digits = v >= 100 || i === 0 ? 0 : v >= 10 ? 1 : 2;
  return `${n < 0 ? "-" : ""}${v.toFixed(digits)} ${units[i]}`;
}

const formatRate = (n) => (n == null ? "—" : `${formatBytes(n)}/s`);
const formatPercent = (n) => (n == null || !Number.isFinite(n) ? "—" : `${n.toFixed(n < 10 && !Number.isInteger(n) ? 1 : 0)}%`);

function formatDuration(seconds) {
  if (seconds == null) return "—";
  let s = Math.floor(seconds);
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}

// --- small DOM helpers (textContent only: names come from users) ---------------------------

function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && key !== "title") node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function setTile(id, value, sub, ratio) {
  const tile = document.getElementById(id);
  if (!tile) return;
  tile.querySelector(".value").textContent = value;
  const subEl = tile.querySelector(".sub");
  if (subEl && sub != null) subEl.textContent = sub;
  const bar = tile.querySelector(".bar > span");
  if (bar && ratio != null) {
    const pct = Math.max(0, Math.min(100, ratio * 100));
    bar.style.width = `${pct}%`;
    bar.parentElement.classList.toggle("high", pct >= 90);
  }
}

function statusPill(status) {
  return h("span", { className: `status status-${status}` }, status);
}

function sessionChips(sessions, opts = {}) {
  if (!sessions || !sessions.length) return h("span", { className: "muted" }, "—");
  return h("div", {}, sessions.map((s) => h("div", { className: "live-session" },
    opts.link === false ? h("strong", {}, s.name || "terminal") : h("a", { href: `/sessions/${s.id}/` }, s.name || "terminal"),
    s.participants.length
      ? s.participants.map((p) => h("span", { className: "chip", title: `${p.role} via ${p.client}` }, p.user))
      : h("span", { className: "muted" }, "nobody attached"))));
}

// --- history: aligned columns over a sliding window (uPlot's data layout) -------------------

class History {
  constructor(windowSeconds) {
    this.windowSeconds = windowSeconds;
    this.t = [];
    this.columns = new Map();
  }

  push(t, values) {
    const n = this.t.length;
    this.t.push(t);
    for (const [key, column] of this.columns) column.push(values.has(key) ? values.get(key) : null);
    for (const [key, value] of values) {
      if (!this.columns.has(key)) this.columns.set(key, [...new Array(n).fill(null), value]);
    }
    let drop = 0;
    while (drop < this.t.length && this.t[drop] < t - this.windowSeconds) drop++;
    if (drop) {
      this.t.splice(0, drop);
      for (const column of this.columns.values()) column.splice(0, drop);
    }
    // Forget series that have nothing left in the window (a deleted environment).
    for (const [key, column] of this.columns) if (column.every((v) => v == null)) this.columns.delete(key);
  }

  data(keys) {
    return [this.t.slice(), ...keys.map((key) => (this.columns.get(key) || this.t.map(() => null)).slice())];
  }
}

// --- charts ------------------------------------------------------------------------------

function showLatest(u) {
  const last = u.data[0].length - 1;
  if (u.cursor.idx == null && last >= 0) u.setLegend({ idx: last }, false);
}

class Chart {
  // series: [{key, label, color?, dash?}]; format: value -> text; softMax: the y axis shows at least 0..softMax.
  constructor(container, { title, format, softMax = 1 }) {
    this.container = container;
    this.title = title;
    this.format = format;
    this.softMax = softMax;
    this.plot = null;
    this.signature = "";
    if (window.ResizeObserver) {
      new ResizeObserver(() => this.plot && this.plot.setSize(this.size())).observe(container);
    }
  }

  size() {
    return { width: Math.max(240, this.container.clientWidth), height: CHART_HEIGHT };
  }

  update(history, series) {
    const keys = series.map((s) => s.key);
    const signature = JSON.stringify(series.map((s) => [s.key, s.label]));
    const data = history.data(keys);
    if (this.plot && signature === this.signature) {
      this.plot.setData(data);
      return;
    }
    // The set of series changed (an environment appeared or went away): rebuild the chart.
    if (this.plot) this.plot.destroy();
    this.signature = signature;
    const format = this.format;
    const softMax = this.softMax;
    const options = {
      ...this.size(),
      title: this.title,
      scales: {
        x: { time: true },
        y: { range: (u, min, max) => [0, Math.max(softMax, (max || 0) * 1.15)] },
      },
      axes: [
        { stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
        { stroke: "#6b7385", grid: { stroke: "#eef0f4" }, size: 78, values: (u, splits) => splits.map((v) => format(v)) },
      ],
      series: [
        { value: (u, v) => (v == null ? "—" : new Date(v * 1000).toLocaleTimeString()) },
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color || PALETTE[i % PALETTE.length],
          width: 2,
          dash: s.dash,
          points: { show: false },
          value: (u, v) => (v == null ? "—" : format(v)),
        })),
      ],
      legend: { live: true },
      // Off the chart, the legend shows the latest values instead of dashes.
      hooks: { draw: [showLatest], setCursor: [showLatest] },
    };
    this.plot = new uPlot(options, data, this.container);
  }
}

// --- the poller ------------------------------------------------------------------------------

function mountMonitor(options) {
  const { mode, envId } = options;
  const url = mode === "environment" ? `/api/v1/monitor/?environment=${encodeURIComponent(envId)}` : "/api/v1/monitor/";
  const state = { samples: 0, stopped: false, previous: new Map() };
  window.lslMonitor = state;
  const updated = document.getElementById("monitor-updated");
  const errorBox = document.getElementById("monitor-error");
  const view = mode === "environment" ? environmentView(envId) : hostView();

  function showError(text) {
    if (errorBox) { errorBox.hidden = !text; errorBox.textContent = text || ""; }
  }

  // Network counters become rates between two polls; a counter that went down (restart) gives no rate.
  function rates(env, t) {
    const stats = env.stats;
    const before = state.previous.get(env.id);
    if (!stats || stats.error) { state.previous.delete(env.id); return { rx: null, tx: null }; }
    state.previous.set(env.id, { t, rx: stats.network_rx_bytes, tx: stats.network_tx_bytes });
    if (!before || t <= before.t) return { rx: null, tx: null };
    const rate = (now, then) => (now >= then ? (now - then) / (t - before.t) : null);
    return { rx: rate(stats.network_rx_bytes, before.rx), tx: rate(stats.network_tx_bytes, before.tx) };
  }

  async function poll() {
    if (state.stopped) return;
    const started = performance.now();
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.status === 404 && mode === "environment") {
        state.stopped = true;
        view.gone();
        showError("This environment was deleted, or your access to it was revoked.");
        return;
      }
      if (response.status === 401 || response.status === 403) {
        state.stopped = true;
        showError("You are signed out, or no longer allowed to see this page. Reload to sign in again.");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      const t = Date.now() / 1000;
      for (const env of data.environments) env.rates = rates(env, t);
      view.render(data, t);
      state.samples += 1;
      showError("");
      if (updated) updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      showError(`Could not refresh (${err.message}); retrying.`);
    }
    // Start-to-start every POLL_MS: a stats sample itself takes about a second.
    setTimeout(poll, Math.max(250, POLL_MS - (performance.now() - started)));
  }
  poll();
  return state;
}

// The staff page: host tiles and charts, every environment's figures and sessions.
function hostView() {
  const hostHistory = new History(WINDOW_SECONDS);
  const envCpu = new History(WINDOW_SECONDS);
  const envMemory = new History(WINDOW_SECONDS);
  const charts = {
    hostCpu: new Chart(document.getElementById("chart-host-cpu"), { title: "Host CPU", format: formatPercent, softMax: 100 }),
    hostMemory: new Chart(document.getElementById("chart-host-memory"), { title: "Host memory used", format: formatBytes, softMax: 1 }),
    envCpu: new Chart(document.getElementById("chart-env-cpu"), { title: "Environments CPU (100% = one core)", format: formatPercent, softMax: 5 }),
    envMemory: new Chart(document.getElementById("chart-env-memory"), { title: "Environments memory", format: formatBytes, softMax: 1 }),
  };
  const tbody = document.querySelector("#monitor-envs tbody");

  function renderHost(host) {
    const engine = host.engine || {};
    setTile("host-cpu", formatPercent(host.cpu_percent),
      `${host.cpu_count} cores · load ${(host.load_average || []).map((x) => x.toFixed(2)).join(" ")}`, host.cpu_percent / 100);
    setTile("host-memory", formatBytes(host.memory_used_bytes), `of ${formatBytes(host.memory_total_bytes)}`,
      host.memory_used_bytes / host.memory_total_bytes);
    setTile("host-disk", formatBytes(host.disk_used_bytes), `of ${formatBytes(host.disk_total_bytes)}`,
      host.disk_used_bytes / host.disk_total_bytes);
    if (engine.error) setTile("host-engine", "down", engine.error);
    else setTile("host-engine", `${engine.containers_running} running`, `Docker ${engine.server_version} · ${engine.images} images`);
    document.getElementById("host-engine")?.classList.toggle("down", Boolean(engine.error));
  }

  function renderRows(envs) {
    tbody.replaceChildren();
    if (!envs.length) {
      tbody.appendChild(h("tr", {}, h("td", { colSpan: 10, className: "empty" }, "No environments.")));
      return;
    }
    for (const env of envs) {
      const s = env.stats;
      const failed = s && s.error;
      const memory = s && !failed ? `${formatBytes(s.memory_bytes)} / ${formatBytes(s.memory_limit_bytes)}` : "—";
      const network = s && !failed
        ? h("span", { title: `${formatRate(env.rates.rx)} in, ${formatRate(env.rates.tx)} out` },
          `↓ ${formatBytes(s.network_rx_bytes)} ↑ ${formatBytes(s.network_tx_bytes)}`)
        : "—";
      tbody.appendChild(h("tr", { dataset: { env: env.id } },
        h("td", {}, h("a", { href: `/environments/${env.id}/monitor/`, className: "env-link" }, env.name)),
        h("td", {}, env.owner),
        h("td", {}, env.template),
        h("td", {}, statusPill(env.status)),
        h("td", { className: "num cpu" }, failed ? h("span", { className: "muted", title: s.error }, "error") : s ? formatPercent(s.cpu_percent) : "—"),
        h("td", { className: "num memory" }, memory),
        h("td", { className: "num network" }, network),
        h("td", { className: "num pids" }, s && !failed ? String(s.pids) : "—"),
        h("td", { className: "num uptime" }, formatDuration(env.uptime_seconds)),
        h("td", { className: "sessions-cell" }, sessionChips(env.sessions)),
      ));
    }
  }

  return {
    render(data, t) {
      renderHost(data.host);
      renderRows(data.environments);
      hostHistory.push(t, new Map([["cpu", data.host.cpu_percent], ["memory", data.host.memory_used_bytes]]));
      const sampled = data.environments.filter((env) => env.stats && !env.stats.error);
      envCpu.push(t, new Map(sampled.map((env) => [env.id, env.stats.cpu_percent])));
      envMemory.push(t, new Map(sampled.map((env) => [env.id, env.stats.memory_bytes])));
      const labels = new Map(data.environments.map((env) => [env.id, `${env.owner}/${env.name}`]));
      const envSeries = (history) => [...history.columns.keys()].map((key) => ({ key, label: labels.get(key) || key.slice(0, 8) }));
      charts.hostCpu.update(hostHistory, [{ key: "cpu", label: "CPU" }]);
      charts.hostMemory.update(hostHistory, [{ key: "memory", label: "used" }]);
      charts.envCpu.update(envCpu, envSeries(envCpu));
      charts.envMemory.update(envMemory, envSeries(envMemory));
    },
    gone() {},
  };
}

// One environment: tiles, four charts, its live sessions.
function environmentView(envId) {
  const history = new History(WINDOW_SECONDS);
  const charts = {
    cpu: new Chart(document.getElementById("chart-cpu"), { title: "CPU (100% = one core)", format: formatPercent, softMax: 5 }),
    memory: new Chart(document.getElementById("chart-memory"), { title: "Memory", format: formatBytes, softMax: 1 }),
    network: new Chart(document.getElementById("chart-network"), { title: "Network", format: formatRate, softMax: 1024 }),
    pids: new Chart(document.getElementById("chart-pids"), { title: "Processes", format: (v) => String(Math.round(v)), softMax: 5 }),
  };
  const statusEl = document.getElementById("env-status");
  const sessionsBody = document.querySelector("#monitor-sessions tbody");

  function renderSessions(sessions) {
    sessionsBody.replaceChildren();
    if (!sessions.length) {
      sessionsBody.appendChild(h("tr", {}, h("td", { colSpan: 3, className: "empty" }, "No live terminal sessions.")));
      return;
    }
    for (const s of sessions) {
      sessionsBody.appendChild(h("tr", { dataset: { session: s.id } },
        h("td", {}, h("a", { href: `/sessions/${s.id}/` }, s.name || s.id.slice(0, 8))),
        h("td", {}, new Date(s.created_at).toLocaleString()),
        h("td", {}, s.participants.length
          ? s.participants.map((p) => h("span", { className: "chip", title: `${p.role} via ${p.client}` }, `${p.user} · ${p.role} · ${p.client}`))
          : h("span", { className: "muted" }, "nobody attached"))));
    }
  }

  return {
    render(data, t) {
      const env = data.environments.find((e) => e.id === envId);
      if (!env) return;
      statusEl.textContent = env.status;
      statusEl.className = `status status-${env.status}`;
      const s = env.stats && !env.stats.error ? env.stats : null;
      const limits = env.limits || {};
      const idle = env.status === "running" ? (env.stats && env.stats.error) || "sampling…" : `not running (${env.status})`;
      setTile("env-cpu", s ? formatPercent(s.cpu_percent) : "—", s ? `of ${limits.cpus} CPU allowed` : idle,
        s && limits.cpus ? s.cpu_percent / 100 / limits.cpus : 0);
      setTile("env-memory", s ? formatBytes(s.memory_bytes) : "—", s ? `of ${formatBytes(s.memory_limit_bytes)}` : idle,
        s && s.memory_limit_bytes ? s.memory_bytes / s.memory_limit_bytes : 0);
      setTile("env-network", s ? `↓ ${formatBytes(s.network_rx_bytes)} ↑ ${formatBytes(s.network_tx_bytes)}` : "—",
        s ? `${formatRate(env.rates.rx)} in · ${formatRate(env.rates.tx)} out` : idle);
      setTile("env-pids", s ? String(s.pids) : "—", s ? `of ${limits.pids} allowed` : idle, s && limits.pids ? s.pids / limits.pids : 0);
      setTile("env-uptime", formatDuration(env.uptime_seconds), env.started_at ? `since ${new Date(env.started_at).toLocaleString()}` : "");
      renderSessions(env.sessions);

      history.push(t, new Map([
        ["cpu", s ? s.cpu_percent : null],
        ["memory", s ? s.memory_bytes : null],
        ["rx", env.rates.rx], ["tx", env.rates.tx],
        ["pids", s ? s.pids : null],
      ]));
      charts.cpu.update(history, [{ key: "cpu", label: "CPU" }]);
      charts.memory.update(history, [{ key: "memory", label: "used" }]);
      charts.network.update(history, [{ key: "rx", label: "in" }, { key: "tx", label: "out", color: PALETTE[3] }]);
      charts.pids.update(history, [{ key: "pids", label: "pids", color: PALETTE[4] }]);
    },
    gone() {
      statusEl.textContent = "gone";
      statusEl.className = "status status-missing";
    },
  };
}

window.LSL = Object.assign(window.LSL || {}, { uPlot, mountMonitor, formatBytes });
