// Placeholder entry point for session replay: bundles asciinema-player and
// exposes it as window.LSL.AsciinemaPlayer (use AsciinemaPlayer.create(src, el, opts)).
import * as AsciinemaPlayer from "asciinema-player";

window.LSL = Object.assign(window.LSL || {}, { AsciinemaPlayer });
