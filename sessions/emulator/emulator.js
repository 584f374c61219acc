// The screen model of every shared terminal in one server process: xterm.js's own parser, run
// headless, one Terminal per session key. sessions/emulator.py starts this program (bundled by
// frontend/build.mjs into dist/emulator.cjs, so it needs no node_modules) and speaks to it over
// stdin/stdout; stderr is for log lines, which the Python side forwards to its logger.
//
//   node --expose-gc emulator.cjs --scrollback=200 --backlog=4194304
//
// Why xterm.js and not a Python emulator: it parses 15-55 MiB/s (pyte: well under 1), off the
// server's event loop and GIL, and a snapshot it serializes is drawn by xterm.js clients exactly
// as the live stream would have drawn it.
//
// Wire format (both ways), binary-safe and framed:
//   u8 type | u16 key length | u32 payload length | key (UTF-8) | payload      (big-endian)
// Python -> node:
//   "O" open      payload: u16 cols, u16 rows  (open of an open key = resize)
//   "D" data      payload: output bytes, any bytes (UTF-8 split across frames is fine)
//   "R" resize    payload: u16 cols, u16 rows
//   "C" close     no payload
//   "S" snapshot  payload: u32 request id [, u32 lines of scrollback (default: --scrollback)]
// node -> Python:
//   "S" snapshot  payload: u32 request id, then the snapshot's bytes (UTF-8)
//   "X" failure   payload: u32 request id, then a message (UTF-8)
//
// Ordering: every terminal runs its frames strictly in arrival order. Data is parsed in the
// background (xterm.js parses in 12 ms slices between event-loop turns, so reading stdin stays
// cheap and prompt); a resize or snapshot waits until all data before it has been parsed.
//
// Flow control: xterm.js throws "write data discarded" past 50 MB of unparsed writes, so at most
// MAX_INFLIGHT bytes are handed to it at a time; the rest waits in the terminal's own queue.
// Output is parsed in batches DEFER_MS apart; the head of the queue is dropped except its sticky
// state (see compact()) when a batch is a flood (over BATCH_BUDGET, about 1 MiB/s), when more than
// --backlog bytes wait (node, at the lowest CPU priority, starved by a busy machine), or more than
// SNAPSHOT_QUEUE when a snapshot is asked for (a joiner must not wait). Snapshots are then
// approximate -- the only inexact case: delivering output to participants wins the CPU over
// following a flood byte by byte.

import { Terminal } from "@xterm/headless";
import { SerializeAddon } from "@xterm/addon-serialize";

const HEADER = 7;
const WRITE_CHUNK = 256 * 1024; // bytes per Terminal.write(): big enough to amortise its per-call cost
const MAX_INFLIGHT = 512 * 1024; // handed to xterm.js but not yet parsed: keeps its write buffer busy
// A snapshot waits for everything queued before it to be parsed. Node runs at the lowest CPU
// priority, so on a busy machine it may be far behind: past this many queued bytes, the queue is
// compacted (see compact()) before a snapshot, so that a joiner never waits long for its screen.
const SNAPSHOT_QUEUE = 1024 * 1024;
// Output is parsed in batches, DEFER_MS after the first byte of a batch arrived (or at once when
// a snapshot or resize needs it). A batch larger than BATCH_BUDGET -- output faster than about
// 1 MiB/s, a flood -- is compacted to its tail first (see compact()): following a flood byte by
// byte would cost the machine up to a core (xterm.js: ~60 ms of CPU per MiB of short lines) for a
// screen nobody is looking at yet. Anything slower (typing, builds, logs) is followed exactly.
const DEFER_MS = 250;
const BATCH_BUDGET = 256 * 1024;

function option(name, fallback) {
  const prefix = `--${name}=`;
  const arg = process.argv.find((a) => a.startsWith(prefix));
  const value = arg === undefined ? fallback : Number(arg.slice(prefix.length));
  if (!Number.isInteger(value) || value < 0) {
    process.stderr.write(`emulator: bad --${name}: ${arg}\n`);
    process.exit(2);
  }
  return value;
}

const SCROLLBACK = option("scrollback", 200);
const BACKLOG = Math.max(option("backlog", 4 * 1024 * 1024), 64 * 1024);

function log(message) {
  process.stderr.write(`emulator: ${message}\n`);
}

// Not a problem, worth a line in the log: the Python side logs these at INFO, the rest at WARNING.
function info(message) {
  process.stderr.write(`info: emulator: ${message}\n`);
}

// --- sticky state: what a dropped head of output leaves behind ------------------------------

const ESC = 0x1b;
const LBRACKET = 0x5b;
const QUESTION = 0x3f;

// The escape sequences in `head` whose effect outlives it: the last setting of each DEC private
// mode, the SGRs since the last SGR reset (SGR is cumulative: "1m" then "31m" is bold red), and
// the last scroll region. Everything else a dropped head did (text, cursor moves) is overwritten
// by the tail that is kept. Scans bytes (memchr for ESC), never a string of the whole head.
function stickyState(head) {
  const modes = new Map();
  let sgr = [];
  let region = "";
  for (let i = head.indexOf(ESC); i >= 0 && i + 2 < head.length; i = head.indexOf(ESC, i + 1)) {
    if (head[i + 1] !== LBRACKET) continue;
    let j = i + 2;
    const priv = head[j] === QUESTION;
    if (priv) j++;
    const from = j;
    while (j < head.length && head[j] >= 0x30 && head[j] <= 0x3b) j++; // digits, ":" and ";"
    if (j >= head.length) break;
    const final = head[j];
    const params = head.toString("latin1", from, j);
    if (priv && (final === 0x68 || final === 0x6c)) { // h, l
      for (const mode of params.split(";")) {
        if (mode) {
          modes.delete(mode); // re-insert: the last setting wins and keeps its place in time
          modes.set(mode, `\x1b[?${mode}${String.fromCharCode(final)}`);
        }
      }
    } else if (!priv && final === 0x6d) { // m
      if (params === "" || params === "0" || params.startsWith("0;")) sgr = [];
      sgr.push(`\x1b[${params}m`);
      if (sgr.length > 32) sgr.shift();
    } else if (!priv && final === 0x72 && /^[0-9]*(;[0-9]*)?$/.test(params)) { // r
      region = `\x1b[${params}r`;
    }
    i = j - 1;
  }
  return Buffer.from([...modes.values()].join("") + region + sgr.join(""), "latin1");
}

// --- one terminal --------------------------------------------------------------------------------

const DEC_GRAPHICS_PROBE = "q"; // DEC special graphics maps "q" to a horizontal line
const GLEVEL_SHIFT = ["\x0f", "\x0e", "\x1bn", "\x1bo"]; // SI, SO, LS2, LS3
const G_DESIGNATE = ["(", ")", "*", "+"];
const MOUSE_PROTOCOL = { X10: "\x1b[?9h", VT200: "\x1b[?1000h", DRAG: "\x1b[?1002h", ANY: "\x1b[?1003h" };
const MOUSE_ENCODING = { SGR: "\x1b[?1006h", SGR_PIXELS: "\x1b[?1016h" };
const CURSOR_STYLE = { block: 2, underline: 4, bar: 6 };
const ALT_DIVIDER = "\x1b[?1049h\x1b[H"; // what SerializeAddon puts between the normal and the alt buffer

const cup = (y, x) => `\x1b[${y + 1};${x + 1}H`;

class Session {
  constructor(key, cols, rows) {
    this.key = key;
    this.term = new Terminal({ cols, rows, scrollback: SCROLLBACK, allowProposedApi: true });
    this.serializer = new SerializeAddon();
    this.term.loadAddon(this.serializer);
    this.ops = []; // {t: "d", bufs, n} | {t: "r", cols, rows} | {t: "s", id}
    this.queued = 0; // data bytes in ops
    this.inflight = 0; // data bytes handed to xterm.js, not yet parsed
    this.closed = false;
    this.warned = false;
    this.pumping = false;
    this.dueBytes = 0; // queued bytes whose batch is due: parse them now
    this.barriers = 0; // resizes and snapshots waiting in ops
    this.timer = null;
  }

  data(buf) {
    const last = this.ops[this.ops.length - 1];
    if (last !== undefined && last.t === "d") {
      last.bufs.push(buf);
      last.n += buf.length;
    } else {
      this.ops.push({ t: "d", bufs: [buf], n: buf.length });
    }
    this.queued += buf.length;
    if (this.queued > BACKLOG) this.compact(BACKLOG >> 1);
    if (this.timer === null) {
      this.timer = setTimeout(() => {
        this.timer = null;
        if (this.closed) return;
        if (this.queued - this.dueBytes > BATCH_BUDGET) this.compact(BATCH_BUDGET);
        this.dueBytes = this.queued;
        this.pump();
      }, DEFER_MS);
    }
    this.pump();
  }

  barrier(op) {
    this.ops.push(op);
    this.barriers += 1;
    if (op.t === "s" && this.queued > SNAPSHOT_QUEUE) this.compact(SNAPSHOT_QUEUE >> 1);
    this.pump();
  }

  close() {
    this.closed = true;
    if (this.timer !== null) clearTimeout(this.timer);
    for (const op of this.ops) if (op.t === "s") fail(this.key, op.id, "terminal closed");
    this.ops = [];
    this.term.dispose();
  }

  pump() {
    if (this.pumping || this.closed) return; // a synchronous write callback re-entering
    this.pumping = true;
    try {
      while (this.ops.length > 0) {
        const op = this.ops[0];
        if (op.t === "d") {
          if (this.inflight >= MAX_INFLIGHT) return;
          if (this.dueBytes <= 0 && this.barriers === 0) return; // deferred: its batch is not due
          const piece = take(op, WRITE_CHUNK);
          if (op.n === 0) this.ops.shift();
          this.queued -= piece.length;
          this.dueBytes = Math.max(0, this.dueBytes - piece.length);
          this.inflight += piece.length;
          this.term.write(piece, () => {
            this.inflight -= piece.length;
            this.pump();
          });
        } else {
          if (this.inflight > 0) return; // barrier: everything before it must be parsed first
          this.ops.shift();
          this.barriers -= 1;
          this.run(op);
        }
      }
    } finally {
      this.pumping = false;
    }
  }

  run(op) {
    if (op.t === "r") {
      if (op.cols !== this.term.cols || op.rows !== this.term.rows) this.term.resize(op.cols, op.rows);
    } else if (op.t === "s") {
      let out;
      try {
        out = this.snapshot(op.scrollback);
      } catch (err) {
        log(`terminal ${this.key}: snapshot failed: ${err && err.stack}`);
        fail(this.key, op.id, String(err && err.message));
        return;
      }
      reply("S", this.key, op.id, Buffer.from(out, "utf8"));
    }
  }

  // A flood outran parsing: drop the head of each long run of queued data, keeping its sticky
  // state and a tail of a few screenfuls (plus scrollback) that starts at a line boundary. Runs
  // are separated by resizes and snapshots, so each snapshot still shows the end of the output
  // before it. (Runs shorter than 2 tails are left whole: only dozens of snapshots or resizes a
  // second during a flood could keep the queue above the backlog that way.)
  compact(target) {
    const keep = Math.min(target, Math.max(256 * 1024, this.term.cols * (this.term.rows + SCROLLBACK) * 8));
    let dropped = 0;
    for (const op of this.ops) {
      if (op.t !== "d" || op.n <= keep * 2) continue;
      const all = op.bufs.length === 1 ? op.bufs[0] : Buffer.concat(op.bufs, op.n);
      let cut = all.length - keep;
      const newline = all.indexOf(10, cut);
      if (newline >= 0 && newline < all.length - 1) cut = newline + 1;
      // CAN aborts any escape sequence the head left open; the terminal keeps its own state
      // (modes set before the head, the screen), which the tail then overwrites.
      const fresh = Buffer.concat([Buffer.from("\x18"), stickyState(all.subarray(0, cut)), all.subarray(cut)]);
      this.queued += fresh.length - op.n;
      dropped += cut;
      op.bufs = [fresh];
      op.n = fresh.length;
      if (this.queued <= target) break;
    }
    if (dropped > 0 && !this.warned) {
      this.warned = true; // once per terminal: floods are expected, this is not an error
      info(`terminal ${this.key}: a flood (more than ${target} bytes waiting to be parsed): ` +
          `skipped ${dropped} bytes but their sticky state; its snapshots may be approximate from now on`);
    }
  }

  // Escape sequences that, written to a freshly reset terminal, reproduce this one: the normal
  // buffer with its scrollback, the alternate buffer over it (the normal one saved underneath,
  // as on the live terminal), the cursor, its style and visibility, SGR, scroll regions, saved
  // cursors, charsets and the modes that change what keys and the mouse send. SerializeAddon
  // draws the buffers and the cursor; the rest it does not restore, so it is added here.
  snapshot(scrollback = SCROLLBACK) {
    const term = this.term;
    const core = term._core; // the addon reads internals too (_inputHandler._curAttrData)
    const normal = core.buffers.normal;
    const alt = core.buffers.alt;
    const inAlt = core.buffers.active === alt;
    const serialized = this.serializer.serialize({ scrollback, excludeModes: true });
    let normalPart = serialized;
    let altPart = "";
    if (inAlt) {
      const at = serialized.lastIndexOf(ALT_DIVIDER); // cell text never contains ESC: unambiguous
      normalPart = serialized.slice(0, at);
      altPart = serialized.slice(at + ALT_DIVIDER.length);
    }
    let out = "\x1bc"; // RIS: start from a clean state whatever the terminal showed before
    const savedCursor = (buffer) =>
      buffer.savedX || buffer.savedY ? `${cup(buffer.savedY, buffer.savedX)}\x1b7\x1b[H` : "";
    const region = (buffer) =>
      buffer.scrollTop !== 0 || buffer.scrollBottom !== term.rows - 1
        ? `\x1b[${buffer.scrollTop + 1};${buffer.scrollBottom + 1}r${cup(buffer.y, buffer.x)}` // DECSTBM homes the cursor
        : "";
    // In the alternate screen, ?1049h below saves the normal cursor as the live terminal did.
    if (!inAlt) out += savedCursor(normal);
    out += normalPart + region(normal);
    if (inAlt) {
      // SGR 0 first: ?1049h fills the alternate screen with the current background.
      out += `\x1b[0m${ALT_DIVIDER}${savedCursor(alt)}${altPart}${region(alt)}`;
    }
    const modes = term.modes;
    if (modes.insertMode) out += "\x1b[4h";
    if (modes.applicationCursorKeysMode) out += "\x1b[?1h";
    if (modes.applicationKeypadMode) out += "\x1b[?66h";
    if (modes.reverseWraparoundMode) out += "\x1b[?45h";
    if (modes.sendFocusMode) out += "\x1b[?1004h";
    if (modes.bracketedPasteMode) out += "\x1b[?2004h";
    if (!modes.wraparoundMode) out += "\x1b[?7l";
    out += MOUSE_PROTOCOL[core.coreMouseService.activeProtocol] ?? "";
    out += MOUSE_ENCODING[core.coreMouseService.activeEncoding] ?? "";
    if (core.coreService.isCursorHidden) out += "\x1b[?25l";
    const style = core.coreService.decPrivateModes.cursorStyle;
    if (style !== undefined) {
      out += `\x1b[${CURSOR_STYLE[style] - (core.coreService.decPrivateModes.cursorBlink ? 1 : 0)} q`;
    }
    // Only DEC special graphics (line drawing) is worth restoring; cells already hold its glyphs.
    const charsets = core._charsetService;
    if (charsets) {
      (charsets._charsets ?? []).forEach((charset, g) => {
        if (charset && charset[DEC_GRAPHICS_PROBE] === "\u2500") out += `\x1b${G_DESIGNATE[g]}0`;
      });
      if (charsets.glevel) out += GLEVEL_SHIFT[charsets.glevel] ?? "";
    }
    if (modes.originMode) {
      // Last: DECOM homes the cursor, and CUP is then relative to the scroll region.
      const active = core.buffers.active;
      out += `\x1b[?6h${cup(active.y - active.scrollTop, active.x)}`;
    }
    return out;
  }
}

// Up to `max` bytes from the front of a data op.
function take(op, max) {
  const first = op.bufs[0];
  if (first.length >= max || op.bufs.length === 1) {
    const n = Math.min(first.length, max);
    if (n === first.length) op.bufs.shift();
    else op.bufs[0] = first.subarray(n);
    op.n -= n;
    return n === first.length ? first : first.subarray(0, n);
  }
  const parts = [];
  let n = 0;
  while (op.bufs.length > 0 && n < max) {
    const buf = op.bufs[0];
    const k = Math.min(buf.length, max - n);
    parts.push(k === buf.length ? buf : buf.subarray(0, k));
    if (k === buf.length) op.bufs.shift();
    else op.bufs[0] = buf.subarray(k);
    n += k;
  }
  op.n -= n;
  return Buffer.concat(parts, n);
}

// --- the wire --------------------------------------------------------------------------------------

const sessions = new Map();

function frame(type, key, id, body) {
  const keyBytes = Buffer.from(key, "utf8");
  const head = Buffer.allocUnsafe(HEADER + keyBytes.length + 4);
  head.writeUInt8(type.charCodeAt(0), 0);
  head.writeUInt16BE(keyBytes.length, 1);
  head.writeUInt32BE(4 + body.length, 3);
  keyBytes.copy(head, HEADER);
  head.writeUInt32BE(id, HEADER + keyBytes.length);
  return Buffer.concat([head, body]);
}

function reply(type, key, id, body) {
  process.stdout.write(frame(type, key, id, body));
}

function fail(key, id, message) {
  reply("X", key, id, Buffer.from(message, "utf8"));
}

function dispatch(type, key, payload) {
  const session = sessions.get(key);
  switch (type) {
    case "O": {
      const cols = payload.readUInt16BE(0);
      const rows = payload.readUInt16BE(2);
      if (session) session.barrier({ t: "r", cols, rows });
      else sessions.set(key, new Session(key, cols, rows));
      break;
    }
    case "D":
      if (session) session.data(payload);
      break;
    case "R":
      if (session) session.barrier({ t: "r", cols: payload.readUInt16BE(0), rows: payload.readUInt16BE(2) });
      break;
    case "C":
      if (session) {
        sessions.delete(key);
        session.close();
      }
      break;
    case "S": {
      const id = payload.readUInt32BE(0);
      const scrollback = payload.length >= 8 ? Math.min(payload.readUInt32BE(4), SCROLLBACK) : SCROLLBACK;
      if (session) session.barrier({ t: "s", id, scrollback });
      else fail(key, id, "no such terminal");
      break;
    }
    default:
      log(`unknown frame type ${JSON.stringify(type)}; exiting`);
      process.exit(3); // the stream is out of step: better a restart from the Python side's tails
  }
}

// Frame reader: stdin chunks are queued until a whole header, then a whole key + payload, is there.
const chunks = [];
let have = 0;
let need = HEADER;
let header = null;
// Input buffers become garbage as fast as output arrives, but V8 collects them only when its own
// (tiny) heap asks for it: during a flood node would sit on ~70 MB of dead buffers. A full
// collection of this small heap every 8 MiB takes a few milliseconds (run with --expose-gc).
const GC_EVERY = 8 * 1024 * 1024;
const gc = typeof globalThis.gc === "function" ? globalThis.gc : undefined;
let received = 0;

function consume(n) {
  const first = chunks[0];
  if (first.length >= n) {
    if (first.length === n) chunks.shift();
    else chunks[0] = first.subarray(n);
    have -= n;
    return first.subarray(0, n);
  }
  const out = Buffer.allocUnsafe(n);
  let off = 0;
  while (off < n) {
    const chunk = chunks[0];
    const k = Math.min(chunk.length, n - off);
    chunk.copy(out, off, 0, k);
    if (k === chunk.length) chunks.shift();
    else chunks[0] = chunk.subarray(k);
    off += k;
  }
  have -= n;
  return out;
}

process.stdin.on("data", (chunk) => {
  chunks.push(chunk);
  have += chunk.length;
  received += chunk.length;
  if (received >= GC_EVERY && gc !== undefined) {
    received = 0;
    gc();
  }
  while (have >= need) {
    if (header === null) {
      const h = consume(HEADER);
      header = { type: String.fromCharCode(h[0]), keyLength: h.readUInt16BE(1), length: h.readUInt32BE(3) };
      need = header.keyLength + header.length;
      if (need === 0) need = -1; // a frame with neither key nor payload: dispatch without reading
    }
    if (have >= need) {
      const body = need > 0 ? consume(need) : Buffer.alloc(0);
      const key = body.subarray(0, header.keyLength).toString("utf8");
      const payload = body.subarray(header.keyLength);
      const type = header.type;
      header = null;
      need = HEADER;
      try {
        dispatch(type, key, payload);
      } catch (err) {
        log(`frame ${type} for ${key}: ${err && err.stack}`);
      }
    }
  }
});

// The parent closed our stdin (it exited, or it is replacing us): nothing left to do.
process.stdin.on("end", () => process.exit(0));
process.stdout.on("error", () => process.exit(0)); // EPIPE: the parent is gone
// `kill -USR2 <pid>`: memory figures in the server's log.
process.on("SIGUSR2", () => log(`memory ${JSON.stringify(process.memoryUsage())}, ${sessions.size} terminal(s)`));
