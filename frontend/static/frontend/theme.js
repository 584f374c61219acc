// Loaded in <head> of every page, before the first paint: applies the theme the user chose with the
// top bar's toggle (localStorage "lsl-theme": "light" | "dark"); without a choice the stylesheet follows
// prefers-color-scheme. A static file, not an inline script (the Content-Security-Policy forbids those).
(function () {
  document.documentElement.classList.add("js"); // the phone menu collapses only when page.js can open it
  try {
    var theme = window.localStorage.getItem("lsl-theme");
    if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  } catch (e) { /* storage disabled: follow the system */ }
})();
