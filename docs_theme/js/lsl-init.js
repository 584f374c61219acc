// The globals the theme's base.js and the search plugin's main.js expect. The stock theme sets them in
// an inline <script>, which LSL's Content-Security-Policy (script-src 'self') blocks; the values come
// from this element's data- attributes instead (docs_theme/main.html).
var lslInit = document.currentScript;
var base_url = lslInit.getAttribute("data-base-url");
var shortcuts = JSON.parse(lslInit.getAttribute("data-shortcuts"));
