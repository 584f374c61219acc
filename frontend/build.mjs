// Bundle the browser assets into static/frontend/dist/ (served by Django's
// staticfiles as "frontend/dist/..."), and the server's terminal emulator
// (../sessions/emulator/emulator.js, xterm.js run headless in node) into
// ../sessions/emulator/dist/emulator.cjs, a single file that needs no node_modules.
//
//   node build.mjs            one-off production build (minified + sourcemaps)
//   node build.mjs --watch    rebuild on change (not minified)
//
// Each entry in src/ becomes an IIFE bundle dist/<name>.js that adds its
// libraries to window.LSL; the libraries' CSS files are copied next to them.
import * as esbuild from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const outdir = path.join(here, "static", "frontend", "dist");
const watch = process.argv.includes("--watch");

// Page bundles. events.js and render.js are shared modules, bundled into each page that imports them;
// page.js is on every page, last: it starts the page's bundle (templates carry no inline script).
const entries = ["terminal", "player", "monitor", "dashboard", "environment", "page"];
const css = [
  "node_modules/@xterm/xterm/css/xterm.css",
  "node_modules/asciinema-player/dist/bundle/asciinema-player.css",
  "node_modules/uplot/dist/uPlot.min.css",
];

const options = {
  absWorkingDir: here,
  entryPoints: Object.fromEntries(entries.map((name) => [name, `src/${name}.js`])),
  outdir,
  bundle: true,
  format: "iife",
  platform: "browser",
  target: ["es2020"],
  minify: !watch,
  sourcemap: true,
  legalComments: "eof",
  logLevel: "info",
  define: { "process.env.NODE_ENV": watch ? '"development"' : '"production"' },
};

// The server-side emulator: a node program, not a page. Its imports live in this
// directory's node_modules, which node's resolution would not find from sessions/.
const emulatorDir = path.join(here, "..", "sessions", "emulator");
const emulatorOptions = {
  absWorkingDir: here,
  entryPoints: [path.join(emulatorDir, "emulator.js")],
  outfile: path.join(emulatorDir, "dist", "emulator.cjs"),
  nodePaths: [path.join(here, "node_modules")],
  bundle: true,
  format: "cjs",
  platform: "node",
  target: ["node18"],
  minify: false, // stack traces in the server's log stay readable; size does not matter here
  sourcemap: false,
  legalComments: "eof",
  logLevel: "info",
};

async function copyCss() {
  await Promise.all(css.map((file) => copyFile(path.join(here, file), path.join(outdir, path.basename(file)))));
}

await rm(outdir, { recursive: true, force: true });
await rm(path.dirname(emulatorOptions.outfile), { recursive: true, force: true });
await mkdir(outdir, { recursive: true });
await copyCss();

if (watch) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
  const emulatorCtx = await esbuild.context(emulatorOptions);
  await emulatorCtx.watch();
  console.log(`watching src/ -> ${path.relative(here, outdir)}/, ${path.relative(here, emulatorOptions.outfile)}`);
} else {
  await Promise.all([esbuild.build(options), esbuild.build(emulatorOptions)]);
  console.log(`copied ${css.map((f) => path.basename(f)).join(", ")}`);
}
