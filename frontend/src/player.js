// Entry point for the replay page: bundles asciinema-player and exposes it as
// window.LSL.AsciinemaPlayer (the page calls AsciinemaPlayer.create(url, el, opts)).
import * as AsciinemaPlayer from "asciinema-player";

window.LSL = Object.assign(window.LSL || {}, { AsciinemaPlayer });
