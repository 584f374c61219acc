// The environment page's "Ports" panel (frontend/templates/frontend/environment.html, #ports-card):
// the ports something listens on inside the environment (found by the worker) and the ones its
// template declares, each with its browser preview; for admins, public preview links: make one with
// an expiry (its URL is shown this once, with a copy button) and revoke them. Reloaded from
// GET /api/v1/environments/<id>/ports/ whenever an `environment.ports` event (or a status change)
// says it changed: environment.js wires the event stream to `load`.
import { h, timeElement } from "./render.js";

const EXPIRIES = [["3600", "1 hour"], ["86400", "1 day"], ["604800", "7 days"]];

export function mountPorts({ envId, canUse, canAdmin }) {
  const api = window.lslApi;
  const card = document.getElementById("ports-card");
  if (!card) return { load: () => Promise.resolve() };
  const body = card.querySelector("#ports tbody");
  const errorEl = card.querySelector("#ports-error");
  const checkedEl = card.querySelector("#ports-checked");
  const createdEl = card.querySelector("#ports-link-created");
  const linksBox = card.querySelector("#preview-links");
  const linksBody = card.querySelector("#preview-links tbody");
  let loading = null;
  let again = false;

  function showError(result, what) {
    errorEl.hidden = false;
    errorEl.textContent = (result.data && result.data.error && result.data.error.detail) || `${what} (HTTP ${result.status}).`;
  }

  function rows(data) {
    // One row per port: listening ones, then declared ones not listening (a declared one that listens
    // is one row, with its name).
    const declared = new Map(data.declared.map((d) => [d.port, d]));
    const out = data.listening.map((p) => ({ port: p.port, name: (declared.get(p.port) || {}).name || "", listening: true,
      loopbackOnly: p.loopback_only, declared: declared.has(p.port), url: p.preview_url }));
    for (const d of data.declared) {
      if (!d.listening) out.push({ port: d.port, name: d.name, listening: false, declared: true, url: d.preview_url });
    }
    return out.sort((a, b) => a.port - b.port);
  }

  function shareControls(port) {
    const select = h("select", { className: "small", "aria-label": `Public link for port ${port} expires after` },
      EXPIRIES.map(([value, label]) => h("option", { value }, label)));
    const button = h("button", { type: "button", className: "small share-port", dataset: { port: String(port) } }, "Share publicly");
    button.addEventListener("click", () => createLink(port, Number(select.value), button));
    return h("span", { className: "share-port-controls" }, select, " ", button);
  }

  let current = null; // the last answer, kept so events can redraw the panel without asking again

  function render(data) {
    current = data;
    errorEl.hidden = true;
    checkedEl.textContent = "";
    if (data.checked_at) checkedEl.append("checked ", timeElement(data.checked_at));
    const items = rows(data);
    const columns = canAdmin ? 5 : 4;
    if (!items.length) {
      body.replaceChildren(h("tr", {}, h("td", { colSpan: columns, className: "muted" },
        "Nothing listens on a TCP port in this environment yet. Start a server (e.g. on port 3000) and it shows up here.")));
    } else {
      body.replaceChildren(...items.map((p) => {
        const state = p.listening ? (p.loopbackOnly ? "listening (localhost only)" : "listening") : "declared, not listening";
        const preview = p.url && p.listening
          ? h("a", { href: p.url, target: "_blank", rel: "noopener", className: "button small primary open-preview" }, "Open preview")
          : p.url ? h("span", { className: "muted" }, "not listening") : h("span", { className: "muted" }, canUse ? "—" : "members only");
        return h("tr", { dataset: { port: String(p.port) }, className: p.listening ? "port-listening" : "port-declared" },
          h("td", {}, h("code", {}, String(p.port))),
          h("td", {}, p.name),
          h("td", {}, state),
          h("td", { className: "actions" }, preview),
          canAdmin ? h("td", { className: "actions" }, shareControls(p.port)) : null);
      }));
    }
    renderLinks(data.links);
  }

  function renderLinks(links) {
    if (!linksBox) return;
    linksBox.hidden = !links || !links.length;
    if (!links) return;
    linksBody.replaceChildren(...links.map((link) => {
      const state = link.active ? "active" : link.revoked_at ? "revoked" : "expired";
      const revoke = link.active ? h("button", { type: "button", className: "small danger revoke-link", dataset: { link: link.id } }, "Revoke") : null;
      if (revoke) revoke.addEventListener("click", () => revokeLink(link.id, revoke));
      return h("tr", { dataset: { link: link.id }, className: `link-${state}` },
        h("td", {}, h("code", {}, String(link.port))),
        h("td", {}, h("code", {}, `${link.token_hint}…`)),
        h("td", {}, link.created_by || ""),
        h("td", {}, timeElement(link.expires_at)),
        h("td", {}, state),
        h("td", { className: "actions" }, revoke));
    }));
  }

  async function createLink(port, expiresIn, button) {
    button.disabled = true;
    const result = await api("POST", `/api/v1/environments/${envId}/ports/links/`, { port, expires_in: expiresIn });
    button.disabled = false;
    if (result.status !== 201) {
      showError(result, "Could not make a public link");
      return;
    }
    // The URL is in this answer only: show it until the page is left, with a copy button.
    const input = h("input", { type: "text", readOnly: true, value: result.data.url, id: "created-link-url", size: 60,
      "aria-label": "Public preview URL" });
    const copy = h("button", { type: "button", className: "small", id: "copy-link" }, "Copy");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(result.data.url);
        copy.textContent = "Copied";
      } catch (err) { // no clipboard permission (plain http): select it for Ctrl-C
        input.select();
        copy.textContent = "Press Ctrl-C";
      }
    });
    createdEl.replaceChildren(
      h("p", {}, `Public link to port ${result.data.port}, until `, timeElement(result.data.expires_at),
        ". Anyone with it can open the preview without signing in. It is shown only now: copy it."),
      h("p", {}, input, " ", copy));
    createdEl.dataset.link = result.data.id;
    createdEl.hidden = false;
    load();
  }

  async function revokeLink(linkId, button) {
    button.disabled = true;
    const result = await api("DELETE", `/api/v1/environments/${envId}/ports/links/${linkId}/`);
    if (result.status !== 204 && result.status !== 404) {
      button.disabled = false;
      showError(result, "Could not revoke the link");
      return;
    }
    if (createdEl.dataset.link === linkId) createdEl.hidden = true; // its URL no longer works
    load();
  }

  // One request at a time; a change announced while one is in flight reads once more after it.
  function load() {
    if (loading) {
      again = true;
      return loading;
    }
    loading = (async () => {
      try {
        const result = await api("GET", `/api/v1/environments/${envId}/ports/`);
        if (result.ok) render(result.data);
        else if (result.status !== 404 && result.status !== 401 && result.status !== 403) showError(result, "Could not list the ports");
      } finally {
        loading = null;
        if (again) {
          again = false;
          load();
        }
      }
    })();
    return loading;
  }

  load();
  // What listens changed (an `environment.ports` event carries the new list) or the environment stopped
  // (nothing listens): redrawn from what the page has, no request. Public links, which only the API
  // lists, are still fetched again when an event says they changed.
  function applyListening(listening, checkedAt) {
    if (!current) return load();
    const url = (port) => (current.preview_url_template ? current.preview_url_template.replace("{port}", String(port)) : null);
    const ports = new Set(listening.map((p) => p.port));
    render({
      ...current,
      listening: listening.map((p) => ({ port: p.port, loopback_only: Boolean(p.loopback_only), preview_url: url(p.port) })),
      declared: current.declared.map((d) => ({ ...d, listening: ports.has(d.port) })),
      checked_at: checkedAt || current.checked_at,
    });
    return Promise.resolve();
  }

  function onEvent(event) {
    if (Array.isArray(event.listening_ports)) return applyListening(event.listening_ports, event.checked_at || null);
    return load();
  }

  return { load, onEvent, stopped: () => applyListening([], null) };
}
