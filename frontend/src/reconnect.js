// When the terminal page reconnects after losing its websocket, and how long it waits
// (docs/protocol.md §2.1). Pure logic, no DOM: terminal.js asks it what to do. `lsl shell` follows
// the same rules with the same numbers (lsl/reconnect.py); tests/test_reconnect_logic.py checks that
// the two agree.
//
// * Final (never reconnect): an `exit` frame came first, or the close code is 1000 (normal end),
//   4403 (access revoked) or 4410 (session ended). Any code not listed below is final too.
// * Retried: 1001, 1005, 1006 (a killed server, a dropped network, or a connection that failed or was
//   refused: browsers report all of these as 1006), 1011, 1012 (the server's graceful restart, after
//   an `error` `server_restarting`), 1013.
// * 4408 (kicked for falling behind) is retried once: a second 4408 within KICK_WINDOW_MS gives up.
// * Waits: BACKOFF_FIRST_MS doubling to BACKOFF_MAX_MS, each ±20% jitter, until GIVE_UP_AFTER_MS
//   have passed since the connection was lost. The outage ends with the new connection's `hello`.

export const BACKOFF_FIRST_MS = 250;
export const BACKOFF_MAX_MS = 4000;
export const JITTER = 0.2;
export const GIVE_UP_AFTER_MS = 120000;
export const KICK_WINDOW_MS = 300000;

export const CLOSE_TOO_SLOW = 4408;
export const RECONNECT_CLOSE_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 4012, 4013]); // 4012/4013: LSL's 1012/1013 (daphne sends only 1000 and 3000-4999)
export const FINAL_CLOSE_CODES = new Set([1000, 4403, 4410]);

// A close that waiting may fix; undefined/null means "no close code at all" (treated as 1006).
export function isTransient(code) {
  return RECONNECT_CLOSE_CODES.has(code === undefined || code === null ? 1006 : code);
}

// The wait before retry number `attempt` (0 for the first): 250 ms, 500 ms, 1 s, 2 s, 4 s, 4 s…, jittered.
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(attempt, 16));
  return Math.min(BACKOFF_MAX_MS, base * (1 - JITTER + 2 * JITTER * random()));
}

export class ReconnectPolicy {
  constructor({ giveUpAfter = GIVE_UP_AFTER_MS, now = () => Date.now(), random = Math.random } = {}) {
    this.giveUpAfter = giveUpAfter;
    this.now = now;
    this.random = random;
    this.lostAt = null; // when the current outage began; null while connected
    this.attempt = 0; // retries so far in this outage
    this.lastKick = null; // when we were last closed with 4408
  }

  get reconnecting() {
    return this.lostAt !== null;
  }

  // A connection closed (or a reconnected one closed again before its `hello`): retry it?
  onClose(code, { exited = false } = {}) {
    if (exited) return false;
    const now = this.now();
    if (code === CLOSE_TOO_SLOW) {
      if (this.lastKick !== null && now - this.lastKick < KICK_WINDOW_MS) return false;
      this.lastKick = now;
    } else if (!isTransient(code)) {
      return false;
    }
    if (this.lostAt === null) {
      this.lostAt = now;
      this.attempt = 0;
    }
    return true;
  }

  // Milliseconds to wait before the next attempt, or null once giveUpAfter has passed since the loss.
  nextDelay() {
    if (this.lostAt === null) return 0;
    const remaining = this.lostAt + this.giveUpAfter - this.now();
    if (remaining <= 0) return null;
    const delay = Math.min(backoffDelay(this.attempt, this.random), remaining);
    this.attempt += 1;
    return delay;
  }

  // A (re)connection got its `hello`: the outage is over.
  onConnected() {
    this.lostAt = null;
    this.attempt = 0;
  }

  // "Reconnect" after giving up: a fresh outage with a fresh time budget.
  restart() {
    this.lostAt = this.now();
    this.attempt = 0;
  }
}
