// Small rendering helpers shared by the live pages (dashboard, environment, monitor).
//
// The same markup is rendered by the Django templates on page load (frontend/templatetags/lsl_live.py
// and _status_cell.html), so keep the two in step: the class names below are what the templates
// emit and what the browser tests read.

// Build an element. Only textContent is ever set from data (names come from users), never innerHTML.
export function h(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value == null || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && key !== "title") node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// A date in the one convention (page.js localizes the server-rendered ones the same way): browser-local
// time as text, UTC in the title, the ISO timestamp in datetime.
const pad2 = (n) => String(n).padStart(2, "0");
export function timeElement(iso) {
  const date = new Date(iso);
  if (!iso || Number.isNaN(date.getTime())) return document.createTextNode("");
  const text = `${date.getFullYear()}-${pad2(date.getMonth() + 1)}-${pad2(date.getDate())} ${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
  const utc = `${date.getUTCFullYear()}-${pad2(date.getUTCMonth() + 1)}-${pad2(date.getUTCDate())} ${pad2(date.getUTCHours())}:${pad2(date.getUTCMinutes())} UTC`;
  const node = h("time", { datetime: iso, title: utc }, text);
  node.dataset.local = "";
  return node;
}

export function formatBytes(n) {
  if (n == null || !Number.isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  const digits = v >= 100 || i === 0 ? 0 : v >= 10 ? 1 : 2;
  return `${n < 0 ? "-" : ""}${v.toFixed(digits)} ${units[i]}`;
}

// --- why it stopped, how far provisioning got ----------------------------------------------------

// stop_reason (docs/protocol.md §3) → what the user reads, the tooltip, and whether it was abnormal.
// "stopped" (a user, or `docker stop`) says nothing the status pill does not already say.
export function describeStopReason(reason) {
  if (!reason || reason === "stopped") return null;
  if (reason === "idle") return { text: "idle", title: "Stopped automatically after being idle", bad: false };
  if (reason === "killed") return { text: "killed", title: "Its container was killed (SIGKILL, e.g. docker kill)", bad: true };
  if (reason === "oom") return { text: "out of memory", title: "The kernel killed it: it ran out of memory (oom)", bad: true };
  if (reason === "disk") return { text: "disk limit", title: "Stopped by LSL: over its disk limit (nothing was deleted; start it, then delete files)", bad: true };
  if (reason === "removed") return { text: "container removed", title: "Its container was removed outside LSL; starting it makes a new one", bad: true };
  const exited = /^exited (-?\d+)$/.exec(reason);
  if (exited) {
    const code = Number(exited[1]);
    return { text: reason, title: `Its main process exited with code ${code}`, bad: code !== 0 };
  }
  return { text: reason, title: reason, bad: true };
}

// progress (docs/protocol.md §3: queued → pulling → creating → user → setup → ready | failed) → one line.
export function describeProgress(progress) {
  const p = progress || {};
  switch (p.phase) {
    case undefined:
    case null:
    case "":
    case "queued":
      return "queued";
    case "pulling":
      if (p.total) {
        const percent = Math.min(100, Math.round((100 * (p.current || 0)) / p.total));
        return `pulling ${p.image || "the image"}: ${percent}% (${formatBytes(p.current || 0)} of ${formatBytes(p.total)})`;
      }
      return `pulling ${p.image || "the image"}…`;
    case "creating":
      return "creating the container";
    case "user":
      return "creating the user";
    case "setup":
      return p.of ? `setup step ${p.step} of ${p.of}${p.command ? `: ${p.command}` : ""}` : "running setup";
    case "ready":
      return "ready";
    case "failed":
      return `failed${p.error ? `: ${p.error}` : ""}`;
    default:
      return p.phase;
  }
}

// --- the status cell: pill + the one line that explains it ---------------------------------------

// "error" (red), "failed" (stopped with an error or an abnormal reason: amber) or "" — mirrors failure() in
// templatetags/lsl_live.py.
export function failureOf(env) {
  if (env.status === "error" || env.status === "missing" || env.status === "node_unavailable") return "error";
  if (env.status === "stopped") {
    const reason = describeStopReason(env.stop_reason);
    if (env.last_error || (reason && reason.bad)) return "failed";
  }
  return "";
}

export function statusClass(env) {
  return `status status-${env.status}${failureOf(env) === "failed" ? " status-failed" : ""}`;
}

export function statusPill(status, env) {
  return h("span", { className: env ? statusClass(env) : `status status-${status}` }, status);
}

function stopReasonChip(reason) {
  const described = describeStopReason(reason);
  if (!described) return null;
  return h("span", { className: `stop-reason${described.bad ? " bad" : ""}`, title: described.title, dataset: { reason } },
    described.text);
}

// What goes next to a status pill: why it stopped, what failed, or how far creating got.
export function statusDetails(env) {
  const details = [];
  if (env.status !== "running" && env.status !== "creating") details.push(stopReasonChip(env.stop_reason));
  if (env.status === "creating") details.push(h("div", { className: "env-detail env-progress" }, describeProgress(env.progress)));
  if (env.last_error && env.status !== "running") {
    details.push(h("div", { className: "env-detail env-error", title: env.last_error }, env.last_error));
  }
  return details.filter(Boolean);
}

// Redraw a dashboard/monitor status cell in place (the pill keeps its node, so tests and tooltips hold on).
export function renderStatusCell(cell, env) {
  const signature = JSON.stringify([env.status, env.stop_reason, env.last_error, env.status === "creating" ? env.progress : null]);
  if (cell.dataset.signature === signature) return;
  cell.dataset.signature = signature;
  cell.replaceChildren(statusPill(env.status, env), ...statusDetails(env));
  const row = cell.closest("tr");
  if (row) {
    const failure = failureOf(env);
    row.classList.toggle("failed", failure === "failed");
    row.classList.toggle("error", failure === "error");
  }
}

// --- live sessions in a table cell (dashboard and staff monitor) ----------------------------------

// sessions: [{id, name, participants: [{user, role, client}]}]
export function sessionLine(session, { link = true } = {}) {
  const participants = session.participants || [];
  return h("div", { className: "live-session", dataset: { session: session.id } },
    link ? h("a", { href: `/sessions/${session.id}/` }, session.name || "terminal") : h("strong", {}, session.name || "terminal"),
    participants.length
      ? participants.map((p) => h("span", { className: "chip", title: `${p.role} via ${p.client}` }, p.user))
      : h("span", { className: "muted" }, "nobody attached"));
}

export function renderSessionsCell(cell, sessions, options) {
  const signature = JSON.stringify(sessions.map((s) => [s.id, s.name, s.participants]));
  if (cell.dataset.signature === signature) return;
  cell.dataset.signature = signature;
  cell.replaceChildren(...(sessions.length ? sessions.map((s) => sessionLine(s, options)) : [h("span", { className: "muted" }, "—")]));
}

// Apply a session.* event to a list of live sessions; returns the new list (the input is not changed).
export function applySessionEvent(sessions, event) {
  const others = sessions.filter((s) => s.id !== event.session);
  const current = sessions.find((s) => s.id === event.session);
  switch (event.type) {
    case "session.opened":
      return current ? sessions : [...sessions, { id: event.session, name: event.name || "", created_at: event.created_at, participants: [] }];
    case "session.presence":
      // A presence for a session we never heard open (opened before our cursor): it is live, so list it.
      return current
        ? sessions.map((s) => (s.id === event.session ? { ...s, participants: event.participants || [] } : s))
        : [...sessions, { id: event.session, name: "", created_at: null, participants: event.participants || [] }];
    case "session.ended":
      return others;
    default:
      return sessions;
  }
}

// The sessions a server-rendered cell shows (div.live-session[data-session] from _live_sessions.html).
export function sessionsFromCell(cell) {
  return [...cell.querySelectorAll(".live-session[data-session]")].map((line) => ({
    id: line.dataset.session,
    name: line.dataset.name || "",
    participants: [...line.querySelectorAll(".chip")].map((chip) => ({
      user: chip.textContent, role: chip.dataset.role || "", client: chip.dataset.client || "",
    })),
  }));
}
