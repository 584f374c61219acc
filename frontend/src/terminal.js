// The terminal page: xterm.js wired to /ws/sessions/<id>/ (docs/protocol.md §2).
//
// Exposes window.LSL.{Terminal, FitAddon, WebLinksAddon} and
// window.LSL.mountTerminal(options), which the page calls once.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { WebLinksAddon } from "@xterm/addon-web-links";

const EMPTY = new Uint8Array(0);
const MAX_BACKOFF_MS = 15000;
const PING_EVERY_MS = 25000;
// Codes after which reconnecting cannot help: access revoked, session already over.
const FINAL_CLOSE_CODES = new Set([4403, 4410]);

function el(id) {
  return document.getElementById(id);
}

function mountTerminal(options) {
  const { sessionId, container, replayUrl } = options;
  const ui = {
    role: el("role-badge"),
    conn: el("conn-status"),
    participants: el("participants"),
    typing: el("typing"),
    ended: el("session-ended"),
    size: el("term-size"),
  };

  const term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace',
    fontSize: 14,
    theme: { background: "#0f1419", foreground: "#e6e1cf" },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.loadAddon(new WebLinksAddon());
  term.open(container);
  window.lslTerm = term;

  const encoder = new TextEncoder();
  let ws = null;
  let canWrite = false;
  let over = false; // the session ended (or access is gone): stop reconnecting
  let attempt = 0;
  let reconnectTimer = null;
  let pingTimer = null;

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

  function fitSize() {
    const dims = fit.proposeDimensions();
    if (!dims || !Number.isFinite(dims.cols) || !Number.isFinite(dims.rows)) return { cols: term.cols, rows: term.rows };
    return { cols: Math.max(2, Math.min(1000, dims.cols)), rows: Math.max(1, Math.min(1000, dims.rows)) };
  }

  function applySize(cols, rows) {
    if (cols > 0 && rows > 0 && (cols !== term.cols || rows !== term.rows)) term.resize(cols, rows);
    if (ui.size) ui.size.textContent = `${term.cols}×${term.rows}`;
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
  }

  function showEnded(code, reason) {
    over = true;
    const what = code === null || code === undefined ? "session ended" : `session ended (code ${code})`;
    ui.ended.hidden = false;
    ui.ended.replaceChildren();
    const text = document.createElement("span");
    text.textContent = reason && reason !== "exited" ? `${what} — ${reason.replace(/_/g, " ")}` : what;
    ui.ended.appendChild(text);
    if (replayUrl) {
      const a = document.createElement("a");
      a.href = replayUrl;
      a.textContent = "watch the recording";
      ui.ended.append(" · ", a);
    }
    term.options.disableStdin = true;
    term.options.cursorBlink = false;
    setConn("ended", "ended");
  }

  function onControl(msg) {
    switch (msg.type) {
      case "hello":
        attempt = 0;
        canWrite = !!msg.can_write;
        if (msg.window) ackEvery = Math.max(1024, Math.floor(msg.window / 4));
        term.options.disableStdin = !canWrite;
        ui.role.textContent = canWrite ? msg.role : "read-only";
        ui.role.className = `badge ${canWrite ? "badge-write" : "badge-readonly"}`;
        ui.role.title = canWrite ? `You are ${msg.role}: you can type.` : "You are a viewer: you can watch but not type.";
        applySize(msg.cols, msg.rows);
        setConn(`connected as ${msg.user}`, "ok");
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
        showEnded(msg.code, msg.reason);
        break;
      case "error":
        if (msg.code === "read_only") setConn("read-only: input ignored", "warn");
        else console.warn("terminal server error", msg.code, msg.detail);
        break;
      default:
        break; // pong and future message types
    }
  }

  async function sessionIsOver() {
    // A refused handshake looks like any other drop (code 1006); ask the API why.
    try {
      const r = await fetch(`/api/v1/sessions/${sessionId}/`, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 404 || r.status === 403) {
        over = true;
        ui.ended.hidden = false;
        ui.ended.textContent = "You no longer have access to this session.";
        setConn("no access", "ended");
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
    }
    return false;
  }

  function scheduleReconnect() {
    if (over || reconnectTimer) return;
    const delay = Math.min(MAX_BACKOFF_MS, 500 * 2 ** attempt) * (0.8 + Math.random() * 0.4);
    attempt += 1;
    setConn(`disconnected — reconnecting in ${Math.ceil(delay / 1000)} s`, "warn");
    reconnectTimer = setTimeout(async () => {
      reconnectTimer = null;
      if (attempt > 1 && (await sessionIsOver())) return;
      connect();
    }, delay);
  }

  function connect() {
    if (over) return;
    const size = fitSize();
    const scheme = window.location.protocol === "https:" ? "wss" : "ws";
    const url = `${scheme}://${window.location.host}/ws/sessions/${sessionId}/?client=web&cols=${size.cols}&rows=${size.rows}`;
    generation += 1;
    received = 0;
    acked = 0;
    snapshotPending = false;
    setConn("connecting…", "");
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    ws = socket;
    socket.onmessage = (event) => {
      if (socket !== ws) return;
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
      ws = null;
      clearInterval(pingTimer);
      if (FINAL_CLOSE_CODES.has(event.code)) {
        if (!over) {
          over = true;
          ui.ended.hidden = false;
          ui.ended.textContent = event.code === 4403 ? "Your access to this environment was revoked." : "session ended";
          setConn("closed", "ended");
        }
        return;
      }
      scheduleReconnect();
    };
    socket.onopen = () => {
      clearInterval(pingTimer);
      pingTimer = setInterval(() => send({ type: "ping", t: Date.now() }), PING_EVERY_MS);
    };
  }

  term.onData((data) => {
    if (canWrite && ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
  });
  term.onBinary((data) => {
    // Mouse reports in legacy encodings: one byte per char code.
    if (!canWrite || !ws || ws.readyState !== WebSocket.OPEN) return;
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
    }, 150);
  });

  connect();
  term.focus();
  return term;
}

window.LSL = Object.assign(window.LSL || {}, { Terminal, FitAddon, WebLinksAddon, mountTerminal });
