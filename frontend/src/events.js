// The live event stream (docs/protocol.md §3), shared by the dashboard, the environment page and
// the monitor pages.
//
// The pages used to poll the REST API every few seconds. Now one WebSocket to /ws/events/ tells
// them what changed, as it changes. This module owns the connection loop, so that every page gets
// the subtle parts right in the same way:
//
//   * resume: it remembers the id of the last event it handled and reconnects with ?since=ID, so
//     a short outage replays what was missed instead of losing it;
//   * refetch: the page's `refetch` callback (which redraws from REST) runs when the server says
//     `resync` (it no longer has the events we missed), after every reconnect, and on the first
//     connect when the page gave no starting id;
//   * backoff: reconnects wait ~0.5 s, 1 s, 2 s … up to 30 s, with jitter, so that a restarted
//     server is not hit by every open browser at the same instant;
//   * fallback: while the socket is down (a proxy that refuses WebSockets, a server restart), the
//     refetch also runs every FALLBACK_POLL_MS. That slow poll is the ONLY timer-driven request
//     left, and pollingDisabled() turns it off (tests do, to prove that events alone do the job);
//   * liveness: a ping every PING_MS; no answer within PONG_TIMEOUT_MS means the connection is
//     dead even if the browser has not noticed yet (a laptop waking up, a NAT that forgot us).
//
// Usage:
//   const stream = openEventStream({since, refetch, onState});
//   stream.on("environment.changed", (event) => …);   // returns a function that unsubscribes
//   stream.on("*", (event) => …);                     // every event
//
// Events carry full replacements (an environment's whole summary, a session's whole participant
// list), so applying one twice is harmless: the pages never need to deduplicate.

const FALLBACK_POLL_MS = 30000;
const PING_MS = 25000;
const PONG_TIMEOUT_MS = 10000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30000;

// Tests set window.LSL_DISABLE_POLLING = true before the page's scripts run, or open the page with
// ?nopoll=1; either way no REST request is made on a timer, only in answer to the stream.
export function pollingDisabled() {
  if (window.LSL_DISABLE_POLLING === true) return true;
  const value = new URLSearchParams(window.location.search).get("nopoll");
  return value !== null && value !== "0" && value !== "false";
}

// The event id the server rendered the page at (a json_script element), or null. Connecting with
// it replays whatever changed between rendering and connecting, so no refetch is needed on load.
export function pageCursor(elementId = "events-since") {
  const element = document.getElementById(elementId);
  if (!element) return null;
  const value = JSON.parse(element.textContent);
  return Number.isInteger(value) ? value : null;
}

// The environment an event is about (its id), whatever the event's shape.
export function environmentIdOf(event) {
  const env = event.environment;
  if (env && typeof env === "object") return env.id;
  return typeof env === "string" ? env : null;
}

class EventStream {
  constructor({ since = null, refetch = null, onState = null } = {}) {
    this.lastId = Number.isInteger(since) ? since : null;
    this.refetchCallback = refetch;
    this.onState = onState;
    this.polling = !pollingDisabled();
    // Tests shorten the fallback poll (window.LSL_FALLBACK_POLL_MS) rather than wait 30 s for it.
    this.fallbackMs = Number(window.LSL_FALLBACK_POLL_MS) || FALLBACK_POLL_MS;
    this.handlers = new Map(); // type (or "*") -> Set of callbacks
    this.state = "connecting"; // connecting | live | down | closed
    this.socket = null;
    this.attempt = 0; // failed connects in a row: drives the backoff
    this.everLive = false;
    this.needsRefetch = false;
    this.timers = { retry: null, poll: null, ping: null, pong: null };
    this.refetching = null;
    this.refetchAgain = false;
    // Counters, for the page's freshness checks and for tests (window.lslEvents).
    this.received = 0;
    this.refetches = 0;
    // "environment:<id>" / "session:<environment id>" -> value of `received` when an event of that
    // family (environment.* or session.*) about that environment was last handled.
    this.touched = new Map();

    // Back on the network, or back from a sleeping tab: do not wait for the backoff timer.
    this.wakeUp = () => { if (this.state === "down") this.reconnectNow(); };
    window.addEventListener("online", this.wakeUp);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) this.wakeUp(); });
  }

  on(type, callback) {
    if (!this.handlers.has(type)) this.handlers.set(type, new Set());
    this.handlers.get(type).add(callback);
    return () => this.handlers.get(type).delete(callback);
  }

  // True when an event about `envId` was handled after `mark` (a value of `received` taken before a
  // REST request): the REST answer may then be older than what the page shows, so keep the event's.
  // `family` is "environment" (its status, progress…) or "session" (its live sessions).
  touchedSince(envId, mark, family = "environment") {
    return (this.touched.get(`${family}:${envId}`) || 0) > mark;
  }

  start() {
    this.connect();
    return this;
  }

  close() {
    this.setState("closed");
    for (const key of Object.keys(this.timers)) this.clearTimer(key);
    window.removeEventListener("online", this.wakeUp);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.onclose = null;
      socket.close();
    }
  }

  // --- the connection ---------------------------------------------------------------------------

  connect() {
    if (this.state === "closed") return;
    this.clearTimer("retry");
    if (this.socket) {
      // A reconnectNow() while an attempt is still pending: drop that attempt, one socket at a time.
      const pending = this.socket;
      this.socket = null;
      pending.onclose = null;
      pending.close();
    }
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = this.lastId === null ? "" : `?since=${this.lastId}`;
    let socket;
    try {
      socket = new WebSocket(`${scheme}//${window.location.host}/ws/events/${query}`);
    } catch (err) {
      this.lost();
      return;
    }
    this.socket = socket;
    // Decided now, not at hello: after an outage the page may show stale state whatever the
    // replay brings (events are not kept forever, and a fallback poll may have raced them).
    this.needsRefetch = this.lastId === null || this.everLive;
    socket.onmessage = (message) => { if (this.socket === socket) this.receive(message.data); };
    // A refused handshake (403: signed out) and a network error both end up here; the browser
    // does not tell them apart, so both retry with backoff (and the fallback poll, which does see
    // the 401/403, lets the page say "signed out").
    socket.onclose = () => { if (this.socket === socket) this.lost(); };
  }

  lost() {
    this.socket = null;
    this.clearTimer("ping");
    this.clearTimer("pong");
    if (this.state === "closed") return;
    this.setState("down");
    this.startFallbackPoll();
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt);
    this.attempt += 1;
    this.timers.retry = setTimeout(() => this.connect(), ceiling / 2 + Math.random() * ceiling / 2);
  }

  reconnectNow() {
    this.attempt = 0;
    this.connect();
  }

  receive(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch (err) {
      return;
    }
    this.clearTimer("pong"); // any frame proves the connection is alive
    switch (event.type) {
      case "hello":
        this.attempt = 0;
        this.everLive = true;
        this.setState("live");
        this.stopFallbackPoll();
        this.startPing();
        if (this.needsRefetch) {
          // The refetch reads state as of now or later, so everything up to hello's id is covered.
          this.needsRefetch = false;
          this.lastId = Math.max(this.lastId || 0, event.last_id || 0);
          this.refetch();
        }
        break;
      case "resync":
        // Events were dropped for us. Before hello (resumed from an id no longer kept): hello
        // triggers the refetch. After it (we fell too far behind): refetch at once.
        if (this.state === "live") this.refetch();
        else this.needsRefetch = true;
        break;
      case "pong":
        break;
      case "error":
        console.warn("event stream:", event.detail || event.code);
        break;
      default:
        if (Number.isInteger(event.id) && (this.lastId === null || event.id > this.lastId)) this.lastId = event.id;
        this.dispatch(event);
    }
  }

  dispatch(event) {
    this.received += 1;
    const envId = environmentIdOf(event);
    const family = event.type.split(".")[0];
    if (envId && (family === "environment" || family === "session")) this.touched.set(`${family}:${envId}`, this.received);
    for (const key of [event.type, "*"]) {
      for (const callback of this.handlers.get(key) || []) {
        try {
          callback(event);
        } catch (err) {
          console.error(`event stream: a handler of ${event.type} failed`, err); // one bad handler must not stop the others
        }
      }
    }
  }

  // --- refetching and the fallback poll ---------------------------------------------------------

  // Runs the page's refetch, never two at once: a request made while one runs queues exactly one more.
  refetch() {
    if (!this.refetchCallback) return Promise.resolve();
    if (this.refetching) {
      this.refetchAgain = true;
      return this.refetching;
    }
    this.refetches += 1;
    this.refetching = (async () => {
      try {
        await this.refetchCallback();
      } catch (err) {
        console.warn("event stream: refetch failed", err);
      } finally {
        this.refetching = null;
        if (this.refetchAgain) {
          this.refetchAgain = false;
          this.refetch();
        }
      }
    })();
    return this.refetching;
  }

  startFallbackPoll() {
    if (!this.polling || this.timers.poll !== null) return;
    this.timers.poll = setInterval(() => this.refetch(), this.fallbackMs);
  }

  stopFallbackPoll() {
    this.clearTimer("poll");
  }

  startPing() {
    this.clearTimer("ping");
    this.timers.ping = setInterval(() => {
      const socket = this.socket;
      if (!socket || socket.readyState !== WebSocket.OPEN) return;
      socket.send(JSON.stringify({ type: "ping", t: Date.now() }));
      this.clearTimer("pong");
      this.timers.pong = setTimeout(() => {
        // No answer: treat the socket as dead now (close() on a dead TCP connection can take minutes to report).
        if (this.socket !== socket) return;
        socket.onclose = null;
        socket.close();
        this.lost();
      }, PONG_TIMEOUT_MS);
    }, PING_MS);
  }

  clearTimer(key) {
    if (this.timers[key] === null) return;
    clearTimeout(this.timers[key]);
    clearInterval(this.timers[key]);
    this.timers[key] = null;
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    if (this.onState) this.onState(state, this);
  }
}

// Opens the page's stream (one per page) and exposes it as window.lslEvents (tests wait on its state).
// Connecting waits for a microtask, so the page has subscribed its handlers (and finished its own
// setup) before the first callback can possibly run.
export function openEventStream(options) {
  const stream = new EventStream(options);
  window.lslEvents = stream;
  queueMicrotask(() => stream.start());
  return stream;
}

// A short human line for the page's "live" indicator.
export function describeStreamState(state, stream) {
  switch (state) {
    case "live": return "live";
    case "connecting": return "connecting…";
    case "down": return stream.polling ? `reconnecting… (refreshing every ${Math.round(stream.fallbackMs / 1000)} s meanwhile)` : "reconnecting…";
    default: return "not updating: reload the page";
  }
}
