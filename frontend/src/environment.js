// One environment's page (frontend/templates/frontend/environment.html), kept current by the event
// stream (src/events.js): status, why it stopped, provisioning progress, errors, the buttons that make
// sense for the status, and the terminal sessions with who is attached. It no longer reloads itself
// on a status change: the controls are redrawn in place.
//
// Exposes window.LSL.mountEnvironment({envId, role, canUse, canAdmin}); the page calls it once.
import { describeProgress, describeStopReason, h, statusClass, timeElement } from "./render.js";
import { describeStreamState, environmentIdOf, openEventStream, pageCursor } from "./events.js";
import { mountPorts } from "./ports.js";

function mountEnvironment({ envId, role, canUse, canAdmin }) {
  const api = window.lslApi;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const statusEl = document.getElementById("env-status");
  const reasonEl = document.getElementById("env-stop-reason");
  const liveEl = document.getElementById("env-live");
  const progressEl = document.getElementById("env-progress");
  const progressText = document.getElementById("env-progress-text");
  const errorEl = document.getElementById("env-error");
  const controls = document.getElementById("controls");
  const openButton = document.getElementById("open-terminal");
  const sessionsBody = document.querySelector("#sessions tbody");
  const sessionsError = document.getElementById("sessions-error");
  let status = statusEl.textContent.trim();
  let sessions = null; // null until the first load answers
  let gone = false;
  const ports = mountPorts({ envId, canUse, canAdmin });

  // --- the environment ---------------------------------------------------------------------------

  function actionForm(action, label, className) {
    // The same form the template renders; the CSRF token comes from the page's meta tag.
    return h("form", { method: "post", action: `/environments/${envId}/${action}/`, className: "inline" },
      h("input", { type: "hidden", name: "csrfmiddlewaretoken", value: csrf }),
      h("button", { type: "submit", className, id: `btn-${action}` }, label));
  }

  // Which buttons make sense depends on the status (mirrors the template's {% if %}s).
  function renderControls() {
    if (!controls || !canUse) return;
    const items = status === "creating"
      ? [h("span", { className: "muted" }, "Provisioning… this page updates by itself.")]
      : status !== "running"
        ? [actionForm("start", "Start", "primary")]
        : [actionForm("stop", "Stop"), actionForm("restart", "Restart")];
    const remove = document.getElementById("btn-delete");
    controls.replaceChildren(...items, ...(canAdmin && remove ? [remove] : []));
    if (openButton) {
      openButton.disabled = status !== "running";
      openButton.title = status === "running" ? "" : "Start the environment first";
    }
  }

  // env: an environment summary (an event's `environment`, or the REST environment).
  function applyEnvironment(env) {
    if (gone) return;
    statusEl.textContent = env.status;
    statusEl.className = statusClass(env);
    const reason = env.status === "running" || env.status === "creating" ? null : describeStopReason(env.stop_reason);
    reasonEl.hidden = !reason;
    reasonEl.textContent = reason ? reason.text : "";
    reasonEl.title = reason ? reason.title : "";
    reasonEl.className = `stop-reason${reason && reason.bad ? " bad" : ""}`;
    progressEl.hidden = env.status !== "creating";
    progressText.textContent = describeProgress(env.progress);
    const showError = Boolean(env.last_error) && env.status !== "running";
    errorEl.hidden = !showError;
    errorEl.textContent = showError ? env.last_error : "";
    if (env.status !== status) {
      status = env.status;
      renderControls();
      if (status !== "running") ports.stopped(); // nothing listens; a started one's ports come as events
    }
  }

  function markGone(text) {
    gone = true;
    stream.close();
    statusEl.textContent = "gone";
    statusEl.className = "status status-missing";
    reasonEl.hidden = true;
    progressEl.hidden = true;
    errorEl.hidden = false;
    errorEl.textContent = text;
    if (openButton) openButton.disabled = true;
  }

  function signedOut(result) {
    if (result.status !== 401 && result.status !== 403) return false;
    stream.close();
    liveEl.textContent = "signed out: reload the page";
    return true;
  }

  async function loadEnvironment() {
    const mark = stream.received;
    const result = await api("GET", `/api/v1/environments/${envId}/`);
    if (result.status === 404) {
      markGone("This environment was deleted, or your access to it was revoked.");
    } else if (signedOut(result)) {
      return;
    } else if (result.ok) {
      // Another role means other controls, share form and access list: the server renders those.
      if (result.data.role && result.data.role !== role) {
        window.location.reload();
        return;
      }
      if (!stream.touchedSince(envId, mark)) applyEnvironment(result.data); // else an event was newer
    }
  }

  // --- sessions (docs/protocol.md §1) -----------------------------------------------------------

  function renderSessions() {
    if (sessions === null) return;
    if (!sessions.length) {
      sessionsBody.replaceChildren(h("tr", {}, h("td", { colSpan: 6, className: "muted" }, "No terminal sessions yet.")));
      return;
    }
    sessionsBody.replaceChildren(...sessions.map((s) => {
      const state = s.live ? "live" : `ended (${s.end_reason || "?"}${s.exit_code == null ? "" : `, code ${s.exit_code}`})`;
      const action = s.live
        ? h("a", { href: `/sessions/${s.id}/`, className: canUse ? "button small primary join" : "button small watch" }, canUse ? "Join" : "Watch")
        : h("a", { href: `/sessions/${s.id}/replay/`, className: "button small replay" }, "Replay");
      return h("tr", { dataset: { session: s.id }, className: s.live ? "session-live" : "session-ended" },
        h("td", {}, s.name || s.id.slice(0, 8)),
        h("td", {}, s.creator || ""),
        h("td", {}, s.created_at ? timeElement(s.created_at) : ""),
        h("td", {}, state),
        h("td", {}, h("span", {}, (s.participants || []).map((p) => h("span", { className: "chip", title: `${p.role} via ${p.client}` }, p.user)))),
        h("td", { className: "actions" }, h("span", {}, action)));
    }));
  }

  async function loadSessions() {
    const mark = stream.received;
    const result = await api("GET", `/api/v1/environments/${envId}/sessions/`);
    if (result.ok) {
      sessionsError.hidden = true;
      sessions = Array.isArray(result.data) ? result.data : (result.data.results || []);
      renderSessions();
      if (stream.touchedSince(envId, mark, "session")) loadSessions(); // raced an event: read once more
    } else if (result.status !== 404 && !signedOut(result)) {
      sessionsError.hidden = false;
      sessionsError.textContent = (result.data && result.data.error && result.data.error.detail) || `Could not list sessions (HTTP ${result.status}).`;
    }
  }

  function onSession(event) {
    if (environmentIdOf(event) !== envId || sessions === null) return; // the load in flight re-reads (see loadSessions)
    const known = sessions.find((s) => s.id === event.session);
    if (event.type === "session.opened") {
      if (!known) {
        sessions = [{ id: event.session, name: event.name || "", creator: event.creator, created_at: event.created_at,
          live: true, participants: [] }, ...sessions];
      }
    } else if (!known) {
      loadSessions(); // a session from before our cursor that we never listed: read them all
      return;
    } else if (event.type === "session.presence") {
      known.participants = event.participants || [];
    } else if (event.type === "session.ended") {
      Object.assign(known, { live: false, end_reason: event.reason, exit_code: event.exit_code, participants: [] });
    }
    renderSessions();
  }

  // --- events ------------------------------------------------------------------------------------

  const stream = openEventStream({
    since: pageCursor(),
    refetch: () => Promise.all([loadEnvironment(), loadSessions(), ports.load()]),
    onState: (state, s) => {
      if (!gone) liveEl.textContent = describeStreamState(state, s);
      liveEl.dataset.state = state;
    },
  });
  const mine = (callback) => (event) => { if (environmentIdOf(event) === envId) callback(event); };
  stream.on("environment.changed", mine((event) => applyEnvironment(event.environment)));
  stream.on("environment.deleted", mine(() => markGone("This environment was deleted.")));
  stream.on("environment.ports", mine((event) => ports.onEvent(event))); // listening ports or public links changed
  stream.on("session.opened", onSession);
  stream.on("session.presence", onSession);
  stream.on("session.ended", onSession);
  // Our access (or a team's we are in) changed: ask whether we still see it, and with which role.
  stream.on("access.changed", mine(() => loadEnvironment()));
  stream.on("team.changed", () => loadEnvironment());

  loadSessions(); // once: the table is not rendered server-side; events keep it current from here

  // --- opening a terminal -----------------------------------------------------------------------

  if (openButton) {
    openButton.addEventListener("click", async () => {
      openButton.disabled = true;
      // A first guess at the size; the terminal page reports the real one when it connects.
      const result = await api("POST", `/api/v1/environments/${envId}/sessions/`, { cols: 120, rows: 32 });
      if (result.status === 201) {
        window.location.href = `/sessions/${result.data.id}/`;
        return;
      }
      openButton.disabled = status !== "running";
      sessionsError.hidden = false;
      sessionsError.textContent = (result.data && result.data.error && result.data.error.detail) || `Could not open a terminal (HTTP ${result.status}).`;
    });
  }
  return stream;
}

window.LSL = Object.assign(window.LSL || {}, { mountEnvironment });
