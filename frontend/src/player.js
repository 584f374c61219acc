// Entry point for the replay page: bundles asciinema-player and exposes it as
// window.LSL.AsciinemaPlayer, and window.LSL.mountReplay({sessionId, container, error}) which
// src/page.js calls on the replay page (frontend/templates/frontend/replay.html).
import * as AsciinemaPlayer from "asciinema-player";

function mountReplay({ sessionId, container, error }) {
  const url = `/api/v1/sessions/${sessionId}/recording/`;
  // Check first, so a missing recording gets a message instead of a silent empty player.
  return fetch(url, { method: "HEAD", credentials: "same-origin" }).then((r) => {
    if (!r.ok) {
      error.hidden = false;
      error.textContent = r.status === 404 ? "This session has no recording." : `The recording could not be loaded (HTTP ${r.status}).`;
      return null;
    }
    window.lslPlayer = AsciinemaPlayer.create(url, container, {
      fit: "both", idleTimeLimit: 1, autoPlay: true, preload: true,
      terminalFontFamily: 'ui-monospace, "DejaVu Sans Mono", monospace',
    });
    return window.lslPlayer;
  });
}

window.LSL = Object.assign(window.LSL || {}, { AsciinemaPlayer, mountReplay });
