// Placeholder entry point for the terminal page: bundles xterm.js and its
// addons and exposes them as window.LSL.{Terminal, FitAddon, WebLinksAddon}.
// The page code (WebSocket wiring, resize, reconnect) is written separately.
import { Terminal } from "@xterm/xterm";
import { FitAddon } from "@xterm/addon-fit";
import { WebLinksAddon } from "@xterm/addon-web-links";

window.LSL = Object.assign(window.LSL || {}, { Terminal, FitAddon, WebLinksAddon });
