// The live monitor pages: /monitor/ (staff: host + every environment) and
// /environments/<id>/monitor/ (one environment).
//
// Two sources, because they answer different questions:
//   * the event stream (src/events.js) says what *changed*: statuses, why an environment stopped,
//     sessions opening and ending, who is attached, environments created and deleted. Those update
//     the page the moment they happen;
//   * GET /api/v1/monitor/ every 2 s gives the *figures* (CPU, memory, network, pids: the worker's
//     latest samples). No event carries them, so the charts keep sampling. The answer also carries
//     statuses and sessions; an event handled while a request was in flight wins over it.
// With polling disabled (window.LSL_DISABLE_POLLING or ?nopoll=1, for tests) the figures are read
// once, and everything after that comes from events only.
//
// Exposes window.LSL.{uPlot, mountMonitor, formatBytes}; the page calls
// LSL.mountMonitor({mode: "host"}) or LSL.mountMonitor({mode: "environment", envId}) once.
// window.lslMonitor.samples counts successful polls (the browser tests wait on it).
import uPlot from "uplot";
import { describeStreamState, environmentIdOf, openEventStream, pageCursor, pollingDisabled } from "./events.js";
import { applySessionEvent, describeStopReason, formatBytes, h, renderStatusCell, sessionLine, sessionsFromCell, statusClass, timeElement } from "./render.js";

const POLL_MS = 2000;
const WINDOW_SECONDS = 5 * 60;
const CHART_HEIGHT = 190;
// Chart colours follow the page's theme (lsl.css variables, dark mode included) at every redraw (every sample).
function cssVar(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

const PALETTE = ["#2f6fde", "#1f8a4c", "#c93b3b", "#b7791f", "#7b4fd6", "#0f8b8d", "#d6477f", "#5a6072"];

// --- formatting ---------------------------------------------------------------------------

// formatBytes comes from render.js (shared with the other live pages).

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

function sessionChips(sessions) {
  if (!sessions || !sessions.length) return h("span", { className: "muted" }, "—");
  return h("div", {}, sessions.map((session) => sessionLine(session)));
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
        // One sample (the first, or the only one with polling disabled) has no width, and uPlot would
        // then span 1000 days (its one-day default, in milliseconds, on our seconds): show the last minute.
        x: { time: true, range: (u, min, max) => (u.data[0].length === 1 ? [u.data[0][0] - 60, u.data[0][0] + 1] : [min, max]) },
        y: { range: (u, min, max) => [0, Math.max(softMax, (max || 0) * 1.15)] },
      },
      axes: [
        { stroke: () => cssVar("--muted", "#6b7385"), grid: { stroke: () => cssVar("--line", "#eef0f4") } },
        { stroke: () => cssVar("--muted", "#6b7385"), grid: { stroke: () => cssVar("--line", "#eef0f4") }, size: 78, values: (u, splits) => splits.map((v) => format(v)) },
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

// --- the sampler and the event stream -----------------------------------------------------------

// The summary fields an environment.* event carries that the rows and tiles show.
const SUMMARY_FIELDS = ["name", "owner", "template", "status", "stop_reason", "last_error", "progress", "started_at"];

function mountMonitor(options) {
  const { mode, envId } = options;
  const url = mode === "environment" ? `/api/v1/monitor/?environment=${encodeURIComponent(envId)}` : "/api/v1/monitor/";
  const sampling = !pollingDisabled();
  const state = { samples: 0, stopped: false, previous: new Map() };
  window.lslMonitor = state;
  const updated = document.getElementById("monitor-updated");
  const errorBox = document.getElementById("monitor-error");
  const view = mode === "environment" ? environmentView(envId) : hostView();
  let streamState = "connecting";
  let timer = null;
  let inFlight = null;

  function showError(text) {
    if (errorBox) { errorBox.hidden = !text; errorBox.textContent = text || ""; }
  }

  function showUpdated() {
    if (!updated) return;
    const figures = state.lastSample ? `figures ${state.lastSample.toLocaleTimeString()}` : "figures …";
    updated.textContent = `${describeStreamState(streamState, stream)} · ${figures}${sampling ? "" : " (not sampling)"}`;
    updated.dataset.state = streamState;
  }

  function stop(text) {
    state.stopped = true;
    clearTimeout(timer);
    stream.close();
    showError(text);
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

  // One sample of the figures (also the stream's refetch: it carries statuses and sessions too).
  function sample() {
    if (!inFlight) inFlight = fetchSample().finally(() => { inFlight = null; });
    return inFlight;
  }

  async function fetchSample() {
    if (state.stopped) return;
    const mark = stream.received;
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.status === 404 && mode === "environment") {
        view.gone();
        stop("This environment was deleted, or your access to it was revoked.");
        return;
      }
      if (response.status === 401 || response.status === 403) {
        stop("You are signed out, or no longer allowed to see this page. Reload to sign in again.");
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      const t = Date.now() / 1000;
      for (const env of data.environments) env.rates = rates(env, t);
      view.render(data, t, (id, family) => stream.touchedSince(id, mark, family));
      state.samples += 1;
      state.lastSample = new Date();
      showError("");
      showUpdated();
    } catch (err) {
      showError(`Could not refresh the figures (${err.message}); retrying.`);
    }
  }

  // Start-to-start every POLL_MS: a stats read itself can take a while.
  async function loop() {
    const started = performance.now();
    await sample();
    if (!state.stopped) timer = setTimeout(loop, Math.max(250, POLL_MS - (performance.now() - started)));
  }

  const stream = openEventStream({
    since: pageCursor(),
    refetch: sample,
    onState: (s) => { streamState = s; showUpdated(); },
  });
  const event = (callback) => (e) => { if (!state.stopped) callback(e); };
  stream.on("environment.created", event((e) => view.environment(e.environment)));
  stream.on("environment.changed", event((e) => view.environment(e.environment)));
  stream.on("environment.deleted", event((e) => {
    if (mode === "environment" && e.environment.id === envId) {
      view.gone();
      stop("This environment was deleted.");
    } else {
      view.deleted(e.environment.id);
    }
  }));
  for (const type of ["session.opened", "session.presence", "session.ended"]) {
    stream.on(type, event((e) => view.session(environmentIdOf(e), e)));
  }
  // Access to this environment changed: one sample says whether we may still see it (404 if not).
  stream.on("access.changed", event((e) => { if (mode !== "environment" || e.environment === envId) sample(); }));
  stream.on("team.changed", event(() => sample()));

  if (sampling) loop();
  else sample(); // the figures once; from here on the page changes only through events
  showUpdated();
  return state;
}

// Read the server-rendered status cell back (the monitor API does not carry stop reasons or errors).
function summaryFromStatusCell(cell) {
  const reason = cell.querySelector(".stop-reason");
  const error = cell.querySelector(".env-error");
  return {
    status: (cell.querySelector(".status") || {}).textContent || "",
    stop_reason: reason ? reason.dataset.reason : "",
    last_error: error ? error.title : "",
  };
}

// Merge a monitor API answer into the known environments. `fresher(id, family)` says an event about
// that environment was handled while the request was in flight: then the event's view stands.
function mergeSample(known, data, fresher) {
  const merged = new Map();
  for (const env of data.environments) {
    const before = known.get(env.id) || {};
    const entry = { ...before, ...env, stop_reason: before.stop_reason || "", last_error: before.last_error || "" };
    if (fresher(env.id, "environment")) {
      for (const field of SUMMARY_FIELDS) if (field in before) entry[field] = before[field];
    } else if (before.status !== undefined && before.status !== env.status) {
      entry.stop_reason = ""; // an event was missed: whatever we knew of why it stopped is stale
      entry.last_error = "";
    }
    if (fresher(env.id, "session") && before.sessions) entry.sessions = before.sessions;
    merged.set(env.id, entry);
  }
  // Created while the request was in flight: the event put it there, the answer could not.
  for (const [id, entry] of known) if (!merged.has(id) && fresher(id, "environment")) merged.set(id, entry);
  return merged;
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
  // id -> what the row shows: seeded from the server's rows, then samples and events.
  let envs = new Map();
  for (const row of tbody.querySelectorAll("tr[data-env]")) {
    envs.set(row.dataset.env, {
      id: row.dataset.env,
      name: row.querySelector(".env-link").textContent,
      owner: row.children[1].textContent,
      template: row.children[2].textContent,
      ...summaryFromStatusCell(row.querySelector(".status-cell")),
      sessions: sessionsFromCell(row.querySelector(".sessions-cell")),
      stats: null, rates: { rx: null, tx: null }, uptime_seconds: null, sampled: false,
    });
  }

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

  function figure(env, value) {
    if (env.sampled === false) return "…"; // known from an event, not sampled yet
    return value;
  }

  function renderRows() {
    tbody.replaceChildren();
    if (!envs.size) {
      tbody.appendChild(h("tr", {}, h("td", { colSpan: 10, className: "empty" }, "No environments.")));
      return;
    }
    for (const env of envs.values()) {
      // Figures only describe a running container: a stopped one's last sample is history.
      const s = env.status === "running" ? env.stats : null;
      const failed = s && s.error;
      const memory = s && !failed ? `${formatBytes(s.memory_bytes)} / ${formatBytes(s.memory_limit_bytes)}` : "—";
      const network = s && !failed
        ? h("span", { title: `${formatRate(env.rates.rx)} in, ${formatRate(env.rates.tx)} out` },
          `↓ ${formatBytes(s.network_rx_bytes)} ↑ ${formatBytes(s.network_tx_bytes)}`)
        : "—";
      const statusCell = h("td", { className: "status-cell" });
      renderStatusCell(statusCell, env);
      tbody.appendChild(h("tr", { dataset: { env: env.id } },
        h("td", {}, h("a", { href: `/environments/${env.id}/monitor/`, className: "env-link" }, env.name)),
        h("td", {}, env.owner),
        h("td", {}, env.template),
        statusCell,
        h("td", { className: "num cpu" }, figure(env, failed ? h("span", { className: "muted", title: s.error }, "error") : s ? formatPercent(s.cpu_percent) : "—")),
        h("td", { className: "num memory" }, figure(env, memory)),
        h("td", { className: "num network" }, figure(env, network)),
        h("td", { className: "num pids" }, figure(env, s && !failed ? String(s.pids) : "—")),
        h("td", { className: "num uptime" }, figure(env, env.status === "running" ? formatDuration(env.uptime_seconds) : "—")),
        h("td", { className: "sessions-cell" }, sessionChips(env.sessions)),
      ));
    }
  }

  return {
    render(data, t, fresher) {
      envs = mergeSample(envs, data, fresher);
      for (const env of envs.values()) if (data.environments.some((e) => e.id === env.id)) env.sampled = true;
      renderHost(data.host);
      renderRows();
      hostHistory.push(t, new Map([["cpu", data.host.cpu_percent], ["memory", data.host.memory_used_bytes]]));
      const sampled = data.environments.filter((env) => env.stats && !env.stats.error);
      envCpu.push(t, new Map(sampled.map((env) => [env.id, env.stats.cpu_percent])));
      envMemory.push(t, new Map(sampled.map((env) => [env.id, env.stats.memory_bytes])));
      const labels = new Map([...envs.values()].map((env) => [env.id, `${env.owner}/${env.name}`]));
      const envSeries = (history) => [...history.columns.keys()].map((key) => ({ key, label: labels.get(key) || key.slice(0, 8) }));
      charts.hostCpu.update(hostHistory, [{ key: "cpu", label: "CPU" }]);
      charts.hostMemory.update(hostHistory, [{ key: "memory", label: "used" }]);
      charts.envCpu.update(envCpu, envSeries(envCpu));
      charts.envMemory.update(envMemory, envSeries(envMemory));
    },
    environment(summary) {
      const before = envs.get(summary.id);
      const entry = before || { id: summary.id, sessions: [], stats: null, rates: { rx: null, tx: null }, uptime_seconds: null, sampled: false };
      for (const field of SUMMARY_FIELDS) entry[field] = summary[field];
      if (!before) envs = new Map([[summary.id, entry], ...envs]); // newest first, as the server lists them
      renderRows();
    },
    deleted(id) {
      if (envs.delete(id)) renderRows();
    },
    session(id, e) {
      const env = envs.get(id);
      if (!env) return;
      env.sessions = applySessionEvent(env.sessions || [], e);
      renderRows();
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
  const reasonEl = document.getElementById("env-stop-reason");
  const sessionsBody = document.querySelector("#monitor-sessions tbody");
  // What the page shows, seeded from the server's rendering; samples and events keep it current.
  let env = {
    id: envId,
    status: statusEl.textContent.trim(),
    stop_reason: reasonEl ? reasonEl.dataset.reason || "" : "",
    sessions: [...sessionsBody.querySelectorAll("tr[data-session]")].map((row) => ({
      id: row.dataset.session,
      name: row.dataset.name || "",
      created_at: row.dataset.created || null,
      participants: [...row.querySelectorAll(".chip")].map((chip) => ({ user: chip.dataset.user, role: chip.dataset.role, client: chip.dataset.client })),
    })),
    stats: null, rates: { rx: null, tx: null }, limits: {}, uptime_seconds: null,
  };

  function renderStatus() {
    statusEl.textContent = env.status;
    statusEl.className = statusClass(env);
    if (!reasonEl) return;
    const reason = env.status === "running" || env.status === "creating" ? null : describeStopReason(env.stop_reason);
    reasonEl.hidden = !reason;
    reasonEl.textContent = reason ? reason.text : "";
    reasonEl.title = reason ? reason.title : "";
    reasonEl.className = `stop-reason${reason && reason.bad ? " bad" : ""}`;
  }

  function renderTiles() {
    const s = env.status === "running" && env.stats && !env.stats.error ? env.stats : null;
    const limits = env.limits || {};
    const idle = env.status === "running" ? (env.stats && env.stats.error) || "sampling…" : `not running (${env.status})`;
    setTile("env-cpu", s ? formatPercent(s.cpu_percent) : "—", s ? `of ${limits.cpus} CPU allowed` : idle,
      s && limits.cpus ? s.cpu_percent / 100 / limits.cpus : 0);
    setTile("env-memory", s ? formatBytes(s.memory_bytes) : "—", s ? `of ${formatBytes(s.memory_limit_bytes)}` : idle,
      s && s.memory_limit_bytes ? s.memory_bytes / s.memory_limit_bytes : 0);
    setTile("env-network", s ? `↓ ${formatBytes(s.network_rx_bytes)} ↑ ${formatBytes(s.network_tx_bytes)}` : "—",
      s ? `${formatRate(env.rates.rx)} in · ${formatRate(env.rates.tx)} out` : idle);
    setTile("env-pids", s ? String(s.pids) : "—", s ? `of ${limits.pids} allowed` : idle, s && limits.pids ? s.pids / limits.pids : 0);
    const running = env.status === "running";
    setTile("env-uptime", running ? formatDuration(env.uptime_seconds) : "—",
      running && env.started_at ? `since ${timeElement(env.started_at).textContent}` : "not running");
  }

  function renderSessions() {
    const sessions = env.sessions || [];
    sessionsBody.replaceChildren();
    if (!sessions.length) {
      sessionsBody.appendChild(h("tr", {}, h("td", { colSpan: 3, className: "empty" }, "No live terminal sessions.")));
      return;
    }
    for (const s of sessions) {
      sessionsBody.appendChild(h("tr", { dataset: { session: s.id } },
        h("td", {}, h("a", { href: `/sessions/${s.id}/` }, s.name || s.id.slice(0, 8))),
        h("td", {}, s.created_at ? timeElement(s.created_at) : ""),
        h("td", {}, s.participants.length
          ? s.participants.map((p) => h("span", { className: "chip", title: `${p.role} via ${p.client}` }, `${p.user} · ${p.role} · ${p.client}`))
          : h("span", { className: "muted" }, "nobody attached"))));
    }
  }

  return {
    render(data, t, fresher) {
      const merged = mergeSample(new Map([[envId, env]]), data, fresher).get(envId);
      if (!merged) return;
      env = merged;
      renderStatus();
      renderTiles();
      renderSessions();
      const s = env.status === "running" && env.stats && !env.stats.error ? env.stats : null;
      history.push(t, new Map([
        ["cpu", s ? s.cpu_percent : null],
        ["memory", s ? s.memory_bytes : null],
        ["rx", s ? env.rates.rx : null], ["tx", s ? env.rates.tx : null],
        ["pids", s ? s.pids : null],
      ]));
      charts.cpu.update(history, [{ key: "cpu", label: "CPU" }]);
      charts.memory.update(history, [{ key: "memory", label: "used" }]);
      charts.network.update(history, [{ key: "rx", label: "in" }, { key: "tx", label: "out", color: PALETTE[3] }]);
      charts.pids.update(history, [{ key: "pids", label: "pids", color: PALETTE[4] }]);
    },
    environment(summary) {
      if (summary.id !== envId) return;
      for (const field of SUMMARY_FIELDS) env[field] = summary[field];
      renderStatus();
      renderTiles();
    },
    deleted() {},
    session(id, e) {
      if (id !== envId) return;
      env.sessions = applySessionEvent(env.sessions || [], e);
      renderSessions();
    },
    gone() {
      statusEl.textContent = "gone";
      statusEl.className = "status status-missing";
      if (reasonEl) reasonEl.hidden = true;
    },
  };
}

window.LSL = Object.assign(window.LSL || {}, { uPlot, mountMonitor, formatBytes });
