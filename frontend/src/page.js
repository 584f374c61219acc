// Loaded last on every page (frontend/templates/frontend/base.html). The Content-Security-Policy lets
// scripts come only from this server's files, so templates carry no inline script and no on* handler:
// what a page's script needs is in <body data-page="…" data-…> and json_script elements, and this
// file starts the page's bundle (loaded just before it) with that.

// JSON calls to the REST API with the session cookie + CSRF header (the page bundles use it).
window.lslApi = async function lslApi(method, url, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET") headers["X-CSRFToken"] = document.querySelector('meta[name="csrf-token"]').content;
  const response = await fetch(url, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { /* empty or non-JSON body */ }
  return { status: response.status, ok: response.ok, data };
};

// The value of a {{ value|json_script:"id" }} element.
function jsonScript(id) {
  const element = document.getElementById(id);
  return element ? JSON.parse(element.textContent) : undefined;
}

const byId = (id) => document.getElementById(id);

const pages = {
  dashboard: () => window.LSL.mountDashboard({
    filters: jsonScript("dashboard-filters"),
    sessionsUrl: "/api/v1/monitor/?stats=0", // live sessions of every environment, without container stats
  }),
  environment: (data) => window.LSL.mountEnvironment({
    envId: jsonScript("env-id"),
    role: data.role,
    canUse: data.canUse === "true",
    canAdmin: data.canAdmin === "true",
  }),
  "environment-monitor": () => window.LSL.mountMonitor({ mode: "environment", envId: jsonScript("env-id") }),
  monitor: () => window.LSL.mountMonitor({ mode: "host" }),
  terminal: (data) => window.LSL.mountTerminal({
    sessionId: jsonScript("session-id"),
    container: byId("terminal"),
    replayUrl: data.replayUrl,
    envId: data.envId,
    envUrl: data.envUrl,
    canOpen: data.canOpen === "true",
  }),
  replay: () => window.LSL.mountReplay({
    sessionId: jsonScript("session-id"),
    container: byId("player"),
    error: byId("player-error"),
  }),
};

// Small behaviours any page may ask for with an attribute.
function wireAttributes() {
  // <select data-autosubmit>: choosing an option submits its form (the dashboard's filters).
  for (const select of document.querySelectorAll("select[data-autosubmit]")) {
    select.addEventListener("change", () => select.form.submit());
  }
  // <button data-copy="#selector">: copies that element's text.
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(document.querySelector(button.dataset.copy).textContent);
        button.textContent = "Copied";
      } catch (e) {
        button.textContent = "Select and copy";
      }
    });
  }
  // <a data-history-back href="/">: back where the user came from, else to the link's target.
  for (const link of document.querySelectorAll("a[data-history-back]")) {
    link.addEventListener("click", (event) => {
      if (window.history.length > 1) {
        event.preventDefault();
        window.history.back();
      }
    });
  }
}

// --- dates: one convention everywhere --------------------------------------------------------------
// Templates render <time datetime="ISO">…UTC</time> (the `when` filter, templatetags/lsl_live.py); here
// every one becomes the browser's local time, with the UTC time in its title. Scripts that add
// <time> elements later call window.lslLocalTimes(root).
const pad = (n) => String(n).padStart(2, "0");
function formatLocal(date, withTime = true) {
  const day = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
  return withTime ? `${day} ${pad(date.getHours())}:${pad(date.getMinutes())}` : day;
}
function formatUtc(date) {
  return `${date.getUTCFullYear()}-${pad(date.getUTCMonth() + 1)}-${pad(date.getUTCDate())} ${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())} UTC`;
}
window.lslFormatLocal = formatLocal;
window.lslTimeElement = function lslTimeElement(iso, withTime = true) {
  const node = document.createElement("time");
  node.setAttribute("datetime", iso);
  if (!withTime) node.dataset.date = "";
  localizeTime(node);
  return node;
};
function localizeTime(node) {
  const date = new Date(node.getAttribute("datetime"));
  if (Number.isNaN(date.getTime())) return;
  node.textContent = formatLocal(date, !("date" in node.dataset));
  node.title = formatUtc(date);
  node.dataset.local = "";
}
window.lslLocalTimes = function lslLocalTimes(root = document) {
  for (const node of root.querySelectorAll("time[datetime]:not([data-local])")) localizeTime(node);
};

// --- the top bar: phone menu, light/dark toggle ------------------------------------------------------
function wireTopbar() {
  const bar = document.getElementById("topbar");
  const toggle = document.getElementById("nav-toggle");
  if (bar && toggle) {
    toggle.addEventListener("click", () => {
      const open = bar.classList.toggle("collapsed") === false;
      toggle.setAttribute("aria-expanded", String(open));
    });
  }
  const theme = document.getElementById("theme-toggle");
  if (theme) {
    const current = () => document.documentElement.dataset.theme
      || (window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
    const label = () => {
      const next = current() === "dark" ? "light" : "dark";
      theme.textContent = next === "dark" ? "Dark mode" : "Light mode";
      theme.title = `Switch to ${next} mode (your choice is remembered in this browser)`;
      theme.setAttribute("aria-label", theme.title);
    };
    theme.addEventListener("click", () => {
      const next = current() === "dark" ? "light" : "dark";
      document.documentElement.dataset.theme = next;
      try { window.localStorage.setItem("lsl-theme", next); } catch (e) { /* storage disabled */ }
      label();
    });
    label();
  }
}

wireTopbar();
window.lslLocalTimes();
wireAttributes();
const data = document.body.dataset;
if (data.page && pages[data.page]) pages[data.page](data);
