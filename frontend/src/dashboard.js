// The dashboard (frontend/templates/frontend/dashboard.html): the environments table updates itself
// from the event stream (src/events.js). Statuses, stop reasons, errors, provisioning progress and
// live sessions change in place; an environment created (or shared with you) elsewhere gets a row,
// one deleted (or no longer shared) loses it. REST is only asked when the events cannot say enough:
// a new row needs your role on it, and after a resync or reconnect everything is read again.
//
// Exposes window.LSL.mountDashboard({filters, sessionsUrl}); the page calls it once.
import { applySessionEvent, h, renderSessionsCell, renderStatusCell, sessionsFromCell } from "./render.js";
import { describeStreamState, environmentIdOf, openEventStream, pageCursor } from "./events.js";

const COLUMNS = 7;

function mountDashboard({ filters = {}, sessionsUrl = "/api/v1/monitor/?stats=0" } = {}) {
  const tbody = document.querySelector("#environments tbody");
  const updated = document.getElementById("dashboard-updated");
  const notice = document.getElementById("dashboard-new");
  const api = window.lslApi;

  // Live sessions per environment id, seeded from what the server rendered.
  const sessions = new Map();
  // The newest summary an event gave for each environment: a REST answer that raced an event loses to it.
  const latest = new Map();
  const fetching = new Set();

  const rowFor = (id) => tbody.querySelector(`tr[data-env="${CSS.escape(id)}"]`);
  const rows = () => [...tbody.querySelectorAll("tr[data-env]")];
  for (const row of rows()) sessions.set(row.dataset.env, sessionsFromCell(row.querySelector(".sessions-cell")));

  // The page's filters (status, team, template) decide which new environments get a row. A row whose
  // status stops matching stays: rows vanishing while you look at them would be more confusing.
  function matches(env) {
    return (!filters.status || env.status === filters.status)
      && (!filters.team || env.team === filters.team)
      && (!filters.template || env.template === filters.template);
  }

  // --- rows ---------------------------------------------------------------------------------------

  function buildRow(env) {
    return h("tr", { dataset: { env: env.id } },
      h("td", {}, h("a", { className: "env-link", href: `/environments/${env.id}/` }, env.name)),
      h("td", { className: "status-cell" }),
      h("td", { className: "template-cell" }, env.template),
      h("td", {}, env.owner),
      h("td", { className: "team-cell" }, env.team || "—"),
      h("td", { className: "role-cell" }, env.role || "—"),
      h("td", { className: "sessions-cell" }));
  }

  // env: an environment summary (an event's `environment`, or a REST environment: a superset).
  function updateRow(row, env) {
    const link = row.querySelector(".env-link");
    if (link.textContent !== env.name) link.textContent = env.name;
    renderStatusCell(row.querySelector(".status-cell"), env);
    const team = row.querySelector(".team-cell");
    if (team && team.textContent !== (env.team || "—")) team.textContent = env.team || "—";
    const role = row.querySelector(".role-cell");
    if (role && env.role && role.textContent !== env.role) role.textContent = env.role;
    renderSessionsCell(row.querySelector(".sessions-cell"), sessions.get(env.id) || []);
  }

  function insertRow(env, before = tbody.firstChild) {
    const row = buildRow(env);
    updateRow(row, env);
    tbody.insertBefore(row, before);
    syncEmpty();
    return row;
  }

  function removeRow(id) {
    const row = rowFor(id);
    if (row) row.remove();
    sessions.delete(id);
    latest.delete(id);
    syncEmpty();
  }

  // "You have no environments yet" comes and goes with the last row.
  function syncEmpty() {
    const empty = tbody.querySelector("tr.empty-row");
    const anyRow = tbody.querySelector("tr[data-env]");
    if (anyRow && empty) empty.remove();
    if (!anyRow && !empty) {
      const filtered = Object.values(filters).some(Boolean);
      tbody.appendChild(h("tr", { className: "empty-row" }, h("td", { colSpan: COLUMNS, className: "empty" },
        filtered ? "No environment matches these filters." : "You have no environments yet — create one below.")));
    }
  }

  // --- REST, only where events cannot say enough -------------------------------------------------

  // One environment, with your role on it (a new row needs it; events do not carry roles).
  async function fetchOne(id) {
    if (fetching.has(id)) return;
    fetching.add(id);
    const mark = stream.received;
    try {
      const result = await api("GET", `/api/v1/environments/${id}/`);
      if (result.status === 404) {
        removeRow(id); // deleted, or no longer shared with you
      } else if (result.ok) {
        const env = stream.touchedSince(id, mark) && latest.has(id) ? { ...result.data, ...latest.get(id) } : result.data;
        const row = rowFor(id);
        if (row) updateRow(row, env);
        else if (matches(env)) insertRow(env);
      } else if (signedOut(result)) {
        return;
      } else {
        offerReload(latest.get(id));
      }
    } catch (err) {
      offerReload(latest.get(id)); // the network blinked: the user can still reload by hand
    } finally {
      fetching.delete(id);
    }
  }

  async function fetchList() {
    const query = new URLSearchParams({ limit: "200" });
    // Team and template filters are stable; status is not (see matches()), so it is applied here.
    if (filters.team) query.set("team", filters.team);
    if (filters.template) query.set("template", filters.template);
    let url = `/api/v1/environments/?${query}`;
    const envs = [];
    while (url) {
      const result = await api("GET", url);
      if (!result.ok) return result;
      envs.push(...result.data.results);
      const next = result.data.next ? new URL(result.data.next, window.location.href) : null;
      url = next ? next.pathname + next.search : null; // same origin whatever host the server named
    }
    return { ok: true, envs };
  }

  // Everything again (after a resync, a reconnect, a team change, or the fallback poll).
  async function refetch() {
    const mark = stream.received;
    const [list, monitor] = await Promise.all([fetchList(), api("GET", sessionsUrl)]);
    if (signedOut(list) || signedOut(monitor) || !list.ok || !monitor.ok) return;
    const listed = new Map(list.envs.map((env) => [env.id, env]));
    for (const env of monitor.data.environments) {
      if (listed.has(env.id) && !stream.touchedSince(env.id, mark, "session")) sessions.set(env.id, env.sessions);
    }
    for (const row of rows()) {
      const id = row.dataset.env;
      if (!listed.has(id) && !stream.touchedSince(id, mark)) removeRow(id);
    }
    // Rows follow the list's order (newest first); rows only the events know of keep their place at the end.
    // (`position` may be the "no environments" row, which the first insertion removes: then append.)
    let position = tbody.firstChild;
    const here = () => (position && position.parentNode === tbody ? position : null);
    for (const env of list.envs) {
      const fresh = stream.touchedSince(env.id, mark) && latest.has(env.id) ? { ...env, ...latest.get(env.id) } : env;
      let row = rowFor(env.id);
      if (row) {
        updateRow(row, fresh);
        if (row !== here()) tbody.insertBefore(row, here());
      } else if (matches(fresh)) {
        row = insertRow(fresh, here());
      }
      if (row) position = row.nextSibling;
    }
    offerReload(null);
  }

  function signedOut(result) {
    if (!result || (result.status !== 401 && result.status !== 403)) return false;
    stream.close();
    updated.textContent = "signed out: reload the page";
    return true;
  }

  // When a new row cannot be drawn (its fetch failed), say so rather than silently miss it.
  function offerReload(env) {
    notice.hidden = !env;
    if (env) notice.querySelector("span").textContent = `New or changed environment: ${env.owner}/${env.name}.`;
  }

  // --- events ------------------------------------------------------------------------------------

  const stream = openEventStream({
    since: pageCursor(),
    refetch,
    onState: (state, s) => {
      updated.textContent = describeStreamState(state, s);
      updated.dataset.state = state;
    },
  });

  function onEnvironment(event) {
    const env = event.environment;
    latest.set(env.id, env);
    const row = rowFor(env.id);
    if (row) updateRow(row, env);
    else if (matches(env)) fetchOne(env.id); // created, or one we had not heard of: it needs your role
  }
  stream.on("environment.created", onEnvironment);
  stream.on("environment.changed", onEnvironment);
  stream.on("environment.deleted", (event) => removeRow(event.environment.id));

  function onSession(event) {
    const id = environmentIdOf(event);
    const row = id && rowFor(id);
    if (!row) return;
    sessions.set(id, applySessionEvent(sessions.get(id) || [], event));
    renderSessionsCell(row.querySelector(".sessions-cell"), sessions.get(id));
  }
  stream.on("session.opened", onSession);
  stream.on("session.presence", onSession);
  stream.on("session.ended", onSession);

  // A grant given, changed or revoked: that environment may appear, change role or disappear.
  stream.on("access.changed", (event) => { if (event.environment) fetchOne(event.environment); });
  // A team's membership changed: any number of environments may have become (in)visible.
  stream.on("team.changed", () => stream.refetch());

  return stream;
}

window.LSL = Object.assign(window.LSL || {}, { mountDashboard });
