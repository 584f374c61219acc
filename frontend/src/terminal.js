// The terminal page: xterm.js wired to /ws/sessions/<id>/ (docs/protocol.md §2).
//
// Exposes window.LSL.{Terminal, FitAddon, WebLinksAddon} and
// window.LSL.mountTerminal(options), which the page calls once.
//
// Reconnecting (docs/protocol.md §2.1, policy in reconnect.js): when the server or the network goes
// away (a restart, kill -9, a dead link) the page says "reconnecting…" in #conn-status and in a
// banner above the terminal, retries with backoff for up to two minutes, then gives up with a
// "Reconnect" button. Keystrokes typed meanwhile are held (up to INPUT_BUFFER bytes) and sent after
// the new connection's `hello`; its snapshot redraws the terminal.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { WebLinksAddon } from "@xterm/addon-web-links";
import { SearchAddon } from "@xterm/addon-search";
import { GIVE_UP_AFTER_MS, ReconnectPolicy } from "./reconnect.js";

const EMPTY = new Uint8Array(0);
const PING_EVERY_MS = 25000;
// A ping unanswered this long (and nothing else heard) means the connection is dead even if the
// browser has not noticed yet (a laptop waking up, a NAT that forgot us): drop it and reconnect.
const PONG_TIMEOUT_MS = 10000;
// Keystrokes held while reconnecting; beyond this they are dropped, and the banner says so.
const INPUT_BUFFER = 4096;
// Font size: A−/A+ in the toolbar, remembered in this browser.
const FONT_KEY = "lsl-term-font-size";
const FONT_MIN = 9;
const FONT_MAX = 28;
const FONT_DEFAULT = 14;

// exit/session.ended reasons (docs/protocol.md §2) → a sentence for the person.
const END_REASONS = {
  exited: "the shell exited",
  ended: "it was closed",
  idle: "it was idle for too long",
  environment_stopped: "the environment was stopped",
  environment_deleted: "the environment was deleted",
  access_revoked: "your access to the environment was revoked",
  server_error: "the server hit an error",
  server_lost: "the server lost track of the shell",
};

function storedFontSize() {
  try {
    const n = Number(window.localStorage.getItem(FONT_KEY));
    return Number.isFinite(n) && n >= FONT_MIN && n <= FONT_MAX ? n : FONT_DEFAULT;
  } catch (e) {
    return FONT_DEFAULT;
  }
}

function el(id) {
  return document.getElementById(id);
}

function mountTerminal(options) {
  const { sessionId, container, replayUrl, envId, envUrl, canOpen } = options;
  const ui = {
    role: el("role-badge"),
    conn: el("conn-status"),
    participants: el("participants"),
    typing: el("typing"),
    ended: el("session-ended"),
    size: el("term-size"),
    sizeCue: el("size-cue"),
  };
  let me = null; // our username (hello)
  let participants = [];

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace',
    fontSize: storedFontSize(),
    theme: { background: "#0f1419", foreground: "#e6e1cf" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.loadAddon(new WebLinksAddon());
  const search = new SearchAddon();
  term.loadAddon(search);
  term.open(container);
  window.lslTerm = term;

  // The reconnect banner: created here, so the page template needs nothing new.
  const banner = document.createElement("div");
  banner.id = "conn-banner";
  banner.className = "alert";
  banner.hidden = true;
  banner.setAttribute("role", "status");
  banner.setAttribute("aria-live", "polite");
  ui.ended.insertAdjacentElement("afterend", banner);

  const encoder = new TextEncoder();
  let ws = null;
  let canWrite = false;
  let over = false; // the session ended (or access is gone): stop reconnecting
  const policy = new ReconnectPolicy();
  let reconnectTimer = null;
  let pingTimer = null;
  let pongTimer = null;
  let lastHeard = 0; // when the current socket last sent us anything
  let urlSize = null; // the size the current socket's URL announced
  let restarting = false; // the server said `server_restarting` before closing
  let held = []; // keystrokes typed while reconnecting (Uint8Arrays)
  let heldBytes = 0;
  let droppedBytes = 0;

  // Flow-control bookkeeping, per connection.
  let received = 0; // binary payload bytes received so far
  let acked = 0; // last value we sent in an ack
  let ackEvery = 256 * 1024; // window / 4: comfortably inside the protocol's window / 2
  let snapshotPending = false;
  let generation = 0; // bumps per connection, so late write callbacks never ack on a newer socket

  function setConn(text, cls) {
    ui.conn.textContent = text;
    ui.conn.className = `conn ${cls || ""}`;
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function live() {
    // Input goes straight out only on an open socket that has had its `hello`.
    return ws !== null && ws.readyState === WebSocket.OPEN && !policy.reconnecting;
  }

  function showBanner(text, cls, withButton) {
    banner.replaceChildren();
    banner.className = `alert ${cls || ""}`;
    if (cls === "reconnecting") {
      banner.style.borderColor = "#f1e2a4";
      banner.style.background = "#fffbe6";
    } else {
      banner.style.borderColor = "";
      banner.style.background = "";
    }
    const span = document.createElement("span");
    span.textContent = text;
    banner.appendChild(span);
    if (withButton) {
      const button = document.createElement("button");
      button.type = "button";
      button.id = "reconnect-button";
      button.className = "small primary";
      button.textContent = "Reconnect";
      button.style.marginLeft = ".8rem";
      button.addEventListener("click", reconnectNow);
      banner.appendChild(button);
    }
    banner.hidden = false;
  }

  function hideBanner() {
    banner.hidden = true;
    banner.replaceChildren();
  }

  function showReconnecting() {
    const why = restarting ? "The server is restarting" : "Lost the connection to the server";
    let input = "";
    if (canWrite) {
      if (droppedBytes) input = ` Input buffer full: ${droppedBytes} bytes typed since were dropped.`;
      else if (heldBytes) input = ` ${heldBytes} bytes typed meanwhile will be sent when the connection is back.`;
      else input = " What you type now is sent when the connection is back.";
    }
    showBanner(`${why} — reconnecting… (attempt ${policy.attempt})${input}`, "reconnecting", false);
    setConn("reconnecting…", "warn");
  }

  function hold(bytes) {
    const room = INPUT_BUFFER - heldBytes;
    if (bytes.byteLength > room) {
      droppedBytes += bytes.byteLength - Math.max(0, room);
      bytes = bytes.subarray(0, Math.max(0, room));
    }
    if (bytes.byteLength) {
      held.push(bytes);
      heldBytes += bytes.byteLength;
    }
    if (policy.reconnecting) showReconnecting();
  }

  function discardHeld() {
    const n = heldBytes + droppedBytes;
    held = [];
    heldBytes = 0;
    droppedBytes = 0;
    return n;
  }

  function flushHeld() {
    // After a reconnect's `hello`: what was typed meanwhile goes out, in order, before anything new.
    const pending = held;
    const dropped = droppedBytes;
    const n = discardHeld();
    if (!n) return;
    if (!canWrite) {
      console.warn(`read-only now: ${n} bytes typed while reconnecting were not sent`);
      return;
    }
    const all = new Uint8Array(pending.reduce((n, b) => n + b.byteLength, 0));
    let at = 0;
    for (const bytes of pending) {
      all.set(bytes, at);
      at += bytes.byteLength;
    }
    ws.send(all); // one frame: the shell sees it as one burst of typing
    if (dropped) console.warn(`${dropped} bytes typed while reconnecting did not fit the buffer and were dropped`);
  }

  function fitSize() {
    const dims = fit.proposeDimensions();
    if (!dims || !Number.isFinite(dims.cols) || !Number.isFinite(dims.rows)) return { cols: term.cols, rows: term.rows };
    return { cols: Math.max(2, Math.min(1000, dims.cols)), rows: Math.max(1, Math.min(1000, dims.rows)) };
  }

  function applySize(cols, rows) {
    if (cols > 0 && rows > 0 && (cols !== term.cols || rows !== term.rows)) term.resize(cols, rows);
    if (ui.size) ui.size.textContent = `${term.cols}×${term.rows}`;
    updateSizeCue();
  }

  // The session's size is the smallest writer's (docs/protocol.md §2): when that is smaller than this
  // window, say whose window it is, so an unused margin is not a mystery.
  function updateSizeCue() {
    if (!ui.sizeCue) return;
    const mine = fitSize();
    const smaller = !over && (term.cols < mine.cols || term.rows < mine.rows);
    if (!smaller) {
      ui.sizeCue.hidden = true;
      ui.sizeCue.textContent = "";
      return;
    }
    const writers = participants.filter((p) => p.role !== "viewer");
    const others = [...new Set(writers.filter((p) => p.user !== me).map((p) => p.user))];
    const size = `${term.cols}×${term.rows}`;
    let whose;
    if (others.length === 1) whose = `${others[0]}'s window`;
    else if (others.length > 1) whose = `the smallest window (${others.join(", ")})`;
    else whose = "another window of yours";
    ui.sizeCue.textContent = `sized to ${whose} (${size})`;
    ui.sizeCue.title = "A session takes the size of its smallest writer's terminal; the rest of yours stays empty.";
    ui.sizeCue.hidden = false;
  }

  function ack(gen, total, force) {
    // Called from xterm's write callback, i.e. once the bytes are really consumed.
    if (gen !== generation || total <= acked) return;
    if (force || total - acked >= ackEvery) {
      acked = total;
      send({ type: "ack", bytes: total });
    }
  }

  function writeOutput(bytes) {
    received += bytes.byteLength;
    const total = received;
    const gen = generation;
    const last = () => total === received; // nothing newer queued: ack now so the server never waits on us
    if (snapshotPending) {
      snapshotPending = false;
      // Reset in order with the write queue: older queued output is superseded by this redraw.
      term.write(EMPTY, () => term.reset());
    }
    term.write(bytes, () => ack(gen, total, last()));
  }

  function renderParticipants(list, lastTypedBy) {
    participants = list;
    ui.participants.replaceChildren();
    for (const p of list) {
      const li = document.createElement("li");
      li.className = `participant role-${p.role}${p.typing ? " typing" : ""}`;
      li.dataset.user = p.user;
      const name = document.createElement("strong");
      name.textContent = p.user;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = ` ${p.role === "viewer" ? "viewer (read-only)" : p.role} · ${p.client}`;
      li.append(name, meta);
      if (p.typing) {
        const t = document.createElement("span");
        t.className = "typing-mark";
        t.textContent = " ✎ typing";
        li.appendChild(t);
      }
      ui.participants.appendChild(li);
    }
    if (ui.typing) ui.typing.textContent = lastTypedBy ? `last typed: ${lastTypedBy}` : "";
    updateSizeCue();
  }

  // Nobody is "here now" in a session that is over (or that we may no longer see).
  function clearPresence(text) {
    participants = [];
    const li = document.createElement("li");
    li.className = "muted small";
    li.textContent = text;
    ui.participants.replaceChildren(li);
    if (ui.typing) ui.typing.textContent = "";
    if (ui.sizeCue) ui.sizeCue.hidden = true;
  }

  async function openNewTerminal(button) {
    button.disabled = true;
    const size = fitSize();
    const result = await window.lslApi("POST", `/api/v1/environments/${envId}/sessions/`, { cols: size.cols, rows: size.rows });
    if (result.ok && result.data && result.data.id) {
      window.location.assign(`/sessions/${result.data.id}/`);
      return;
    }
    button.disabled = false;
    const detail = (result.data && (result.data.detail || result.data.message)) || `HTTP ${result.status}`;
    const note = document.createElement("span");
    note.className = "field-error";
    note.textContent = `Could not open a terminal: ${detail}`;
    button.insertAdjacentElement("afterend", note);
  }

  // The end of the session (or of our access): why, and what to do next.
  function showOver(headline, detail, { offerNew, offerReplay }) {
    over = true;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    hideBanner();
    discardHeld();
    clearPresence(offerNew || offerReplay ? "nobody: the session is over" : "—");
    ui.ended.hidden = false;
    ui.ended.replaceChildren();
    const text = document.createElement("span");
    text.className = "end-reason";
    text.id = "end-reason";
    text.textContent = headline;
    if (detail) {
      const small = document.createElement("small");
      small.textContent = detail;
      text.appendChild(small);
    }
    ui.ended.appendChild(text);
    if (offerNew && canOpen && envId) {
      const button = document.createElement("button");
      button.type = "button";
      button.id = "new-terminal";
      button.className = "primary small";
      button.textContent = "Open a new terminal";
      button.addEventListener("click", () => openNewTerminal(button));
      ui.ended.appendChild(button);
    }
    if (offerReplay && replayUrl) {
      const a = document.createElement("a");
      a.href = replayUrl;
      a.className = "button small";
      a.textContent = "Watch the recording";
      ui.ended.appendChild(a);
    }
    if (envUrl && offerNew) {
      const back = document.createElement("a");
      back.href = envUrl;
      back.className = "button small";
      back.textContent = "Back to the environment";
      ui.ended.appendChild(back);
    }
    term.options.disableStdin = true;
    term.options.cursorBlink = false;
  }

  function showEnded(code, reason, by) {
    if (reason === "access_revoked") {
      showRevoked();
      return;
    }
    // Worded like the CLI's end line (lsl/shell.py end_text).
    let why = END_REASONS[reason] || (reason ? reason.replace(/_/g, " ") : "");
    if (reason === "ended" && by) why = `ended by ${by}`;
    const showCode = (reason === "exited" || !reason) && code !== null && code !== undefined;
    const codeText = showCode ? ` (exit code ${code})` : "";
    const headline = `Session ended${why ? `: ${why}` : ""}${codeText}.`;
    const gone = reason === "environment_deleted";
    const detail = gone ? "" : reason === "environment_stopped"
      ? "Start the environment again to open a new terminal."
      : "The environment is still there: open a new terminal to carry on.";
    showOver(headline, detail, { offerNew: !gone, offerReplay: true });
    setConn("ended", "ended");
  }

  function showRevoked() {
    showOver("Your access to this environment was revoked.", "Ask its owner or an admin to share it with you again.",
      { offerNew: false, offerReplay: false });
    setConn("no access", "ended");
  }

  function onControl(msg) {
    switch (msg.type) {
      case "hello":
        policy.onConnected();
        restarting = false;
        hideBanner();
        canWrite = !!msg.can_write;
        me = msg.user;
        if (msg.window) ackEvery = Math.max(1024, Math.floor(msg.window / 4));
        term.options.disableStdin = !canWrite;
        ui.role.textContent = canWrite ? msg.role : "read-only";
        ui.role.className = `badge ${canWrite ? "badge-write" : "badge-readonly"}`;
        ui.role.title = canWrite ? `You are ${msg.role}: you can type.` : "You are a viewer: you can watch but not type.";
        applySize(msg.cols, msg.rows);
        setConn(`connected as ${msg.user}`, "ok");
        flushHeld();
        if (canWrite && urlSize) {
          // The window changed while we were away (the URL carried the size from before): say so now.
          const size = fitSize();
          if (size.cols !== urlSize.cols || size.rows !== urlSize.rows) {
            urlSize = size;
            send({ type: "resize", cols: size.cols, rows: size.rows });
          }
        }
        break; // our size already went in the URL; the server answers with the effective size
      case "snapshot":
        applySize(msg.cols, msg.rows);
        snapshotPending = true;
        break;
      case "resize":
        applySize(msg.cols, msg.rows);
        break;
      case "presence":
        renderParticipants(msg.participants || [], msg.last_typed_by);
        break;
      case "exit":
        showEnded(msg.code, msg.reason, msg.by || msg.ended_by);
        break;
      case "error":
        if (msg.code === "read_only") setConn("read-only: input ignored", "warn");
        else if (msg.code === "server_restarting") restarting = true; // the close (1012) follows: reconnect
        else console.warn("terminal server error", msg.code, msg.detail);
        break;
      default:
        break; // pong and future message types
    }
  }

  async function sessionIsOver() {
    // A refused handshake looks like any other drop (code 1006); ask the API why.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 5000);
    try {
      const r = await fetch(`/api/v1/sessions/${sessionId}/`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
        signal: abort.signal,
      });
      if (r.status === 404 || r.status === 403) {
        showRevoked();
        return true;
      }
      if (r.ok) {
        const s = await r.json();
        if (!s.live) {
          showEnded(s.exit_code, s.end_reason);
          return true;
        }
      }
    } catch (e) {
      /* server unreachable: keep retrying */
    } finally {
      clearTimeout(timer);
    }
    return false;
  }

  function scheduleReconnect() {
    if (over || reconnectTimer) return;
    const delay = policy.nextDelay();
    if (delay === null) {
      giveUp();
      return;
    }
    showReconnecting();
    reconnectTimer = setTimeout(async () => {
      reconnectTimer = null;
      // A refused handshake (no access any more) looks like any other failure: from the second retry, ask.
      if (policy.attempt > 1 && (await sessionIsOver())) return;
      if (!over && !ws) connect();
    }, delay);
  }

  function giveUp() {
    const lost = discardHeld();
    term.options.disableStdin = true;
    const secs = Math.round(GIVE_UP_AFTER_MS / 1000);
    const input = lost ? ` ${lost} bytes typed meanwhile were not sent.` : "";
    showBanner(`Lost the connection to the server and could not reconnect within ${secs} s. The shell may still be running there.${input}`, "error", true);
    setConn("disconnected", "ended");
  }

  function reconnectNow() {
    // The "Reconnect" button: a new round of retries with a fresh time budget.
    if (over) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    policy.restart();
    showReconnecting();
    if (!ws) connect();
  }

  function onLost(code) {
    // The socket closed (or we found it dead): reconnect, or say why not.
    ws = null;
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
    if (over) return; // an `exit` frame already said the session is over
    if (policy.onClose(code)) {
      scheduleReconnect();
      return;
    }
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    discardHeld();
    if (code === 4403) {
      showRevoked();
      return;
    }
    if (code === 4410) {
      showEnded(null, null);
      return;
    }
    // Not something waiting fixes (a normal close without `exit`, kicked twice for falling behind, an
    // unknown code): no automatic retry, but the person may try again.
    const why =
      code === 4408
        ? "Disconnected: this terminal fell too far behind the session's output."
        : code === 1000
          ? "The server closed the connection."
          : `Disconnected (close code ${code}).`;
    term.options.disableStdin = true;
    showBanner(why, "error", true);
    setConn("disconnected", "ended");
  }

  function checkAlive(socket, sentAt) {
    if (socket !== ws || lastHeard >= sentAt) return;
    // Nothing heard since our ping: the connection is dead. Drop it without waiting for the browser.
    socket.onclose = null;
    socket.onmessage = null;
    try {
      socket.close();
    } catch (e) {
      /* already closing */
    }
    onLost(1006);
  }

  function connect() {
    if (over) return;
    const size = fitSize();
    urlSize = size;
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${window.location.host}/ws/sessions/${sessionId}/?client=web&cols=${size.cols}&rows=${size.rows}`;
    generation += 1;
    received = 0;
    acked = 0;
    snapshotPending = false;
    if (!policy.reconnecting) setConn("connecting…", "");
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    ws = socket;
    socket.onmessage = (event) => {
      if (socket !== ws) return;
      lastHeard = Date.now();
      if (typeof event.data === "string") {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch (e) {
          return;
        }
        onControl(msg);
      } else {
        writeOutput(new Uint8Array(event.data));
      }
    };
    socket.onclose = (event) => {
      if (socket !== ws) return;
      onLost(event.code);
    };
    socket.onopen = () => {
      if (socket !== ws) return;
      lastHeard = Date.now();
      clearInterval(pingTimer);
      pingTimer = setInterval(() => {
        const sentAt = Date.now();
        send({ type: "ping", t: sentAt });
        clearTimeout(pongTimer);
        pongTimer = setTimeout(() => checkAlive(socket, sentAt), PONG_TIMEOUT_MS);
      }, PING_EVERY_MS);
    };
  }

  term.onData((data) => {
    if (!canWrite || over) return;
    if (live()) ws.send(encoder.encode(data));
    else if (policy.reconnecting) hold(encoder.encode(data)); // sent after the new connection's hello
  });
  term.onBinary((data) => {
    // Mouse reports in legacy encodings: one byte per char code. Not held while reconnecting: a
    // click replayed later, on a redrawn screen, would land somewhere else.
    if (!canWrite || !live()) return;
    const bytes = new Uint8Array(data.length);
    for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 0xff;
    ws.send(bytes);
  });

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      // Writers report their size; the server answers with the effective PTY size.
      if (canWrite) {
        const size = fitSize();
        send({ type: "resize", cols: size.cols, rows: size.rows });
      }
      updateSizeCue();
    }, 150);
  });

  window.addEventListener("online", () => {
    // The network is back: don't wait out the backoff.
    if (reconnectTimer && !over) {
      clearTimeout(reconnectTimer);
      reconnectTimer = null;
      connect();
    }
  });

  // --- toolbar: copy, search, font size ---------------------------------------------------------
  async function copySelection() {
    const text = term.getSelection();
    const button = el("term-copy");
    if (!text) {
      if (button) button.textContent = "Select text first";
    } else {
      try {
        await navigator.clipboard.writeText(text);
        if (button) button.textContent = "Copied";
      } catch (e) {
        if (button) button.textContent = "Copy blocked";
      }
    }
    if (button) setTimeout(() => { button.textContent = "Copy"; }, 1500);
    term.focus();
  }

  const searchInput = el("term-search");
  const searchOptions = { caseSensitive: false }; // a match is selected (and scrolled to)
  function find(backwards) {
    const query = searchInput ? searchInput.value : "";
    if (!query) {
      search.clearDecorations();
      return;
    }
    const found = backwards ? search.findPrevious(query, searchOptions) : search.findNext(query, searchOptions);
    if (searchInput) searchInput.classList.toggle("no-match", !found);
  }
  if (searchInput) {
    searchInput.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        find(event.shiftKey);
      } else if (event.key === "Escape") {
        search.clearDecorations();
        term.focus();
      }
    });
    searchInput.addEventListener("input", () => find(false));
  }
  const on = (id, handler) => {
    const node = el(id);
    if (node) node.addEventListener("click", handler);
  };
  on("term-copy", copySelection);
  on("term-search-next", () => find(false));
  on("term-search-prev", () => find(true));

  function setFontSize(size) {
    const next = Math.max(FONT_MIN, Math.min(FONT_MAX, size));
    term.options.fontSize = next;
    try { window.localStorage.setItem(FONT_KEY, String(next)); } catch (e) { /* storage disabled */ }
    // A new font size is a new window size in cells: writers report it (the server answers with the effective size).
    if (canWrite && !over) {
      const fitted = fitSize();
      send({ type: "resize", cols: fitted.cols, rows: fitted.rows });
    }
    updateSizeCue();
  }
  on("term-font-down", () => setFontSize(term.options.fontSize - 1));
  on("term-font-up", () => setFontSize(term.options.fontSize + 1));

  term.attachCustomKeyEventHandler((event) => {
    if (event.type !== "keydown" || !event.ctrlKey || !event.shiftKey) return true;
    const key = event.key.toLowerCase();
    if (key === "c") {
      copySelection();
      return false;
    }
    if (key === "f" && searchInput) {
      searchInput.focus();
      searchInput.select();
      return false;
    }
    return true;
  });

  connect();
  term.focus();
  return term;
}

window.LSL = Object.assign(window.LSL || {}, { Terminal, FitAddon, WebLinksAddon, SearchAddon, mountTerminal });
