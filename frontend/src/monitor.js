// Placeholder entry point for the live monitor: bundles uPlot and exposes it
// as window.LSL.uPlot.
import uPlot from "uplot";

window.LSL = Object.assign(window.LSL || {}, { uPlot });
