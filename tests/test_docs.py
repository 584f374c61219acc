"""The documentation: in step with the code, built strictly by MkDocs, and served by LSL at /docs/.

* Every `env_*("LSL_…")` read in lsl_site/settings.py, and every field of the catalog and environment
  schemas, is named in docs/configuration.md: settings are added all the time, and a setting nobody can
  find is a setting nobody can use.
* `mkdocs build --strict` passes (a broken link or anchor fails it; shown by breaking one), and the
  built pages load nothing from another origin and run no inline script, so they work offline and
  under LSL's Content-Security-Policy.
* A live daphne serves the site at /docs/: the index, a page, its assets, with the policy header.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import REPO

CONFIGURATION = REPO / "docs" / "configuration.md"
SITE = REPO / "site"  # mkdocs.yml's site_dir, which lsl_site/docs_site.py serves


def settings_variables() -> list[str]:
    """Names of the LSL_* variables lsl_site/settings.py reads through lsl_site/env.py's helpers."""
    tree = ast.parse((REPO / "lsl_site" / "settings.py").read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("env_")
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.append(node.args[0].value)
    return sorted(set(names))


def test_every_setting_is_documented() -> None:
    names = settings_variables()
    # The parse must find the settings at all (a rename of the helpers would otherwise pass vacuously).
    assert len(names) > 40 and "LSL_SECRET_KEY" in names and "LSL_QUOTA_USER_TEAMS" in names, names
    assert all(name.startswith("LSL_") for name in names), names
    text = CONFIGURATION.read_text()
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"settings read in lsl_site/settings.py but not documented in docs/configuration.md: {missing}"


def schema_fields(schema: dict[str, Any], node: dict[str, Any], seen: set[str] | None = None) -> set[str]:
    """Every property name in an object schema and the objects below it, following local $refs."""
    seen = set() if seen is None else seen
    names: set[str] = set()
    if "$ref" in node:
        ref = node["$ref"]
        if ref in seen:
            return names
        seen.add(ref)
        target: Any = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        names |= schema_fields(schema, target, seen)
    for name, sub in (node.get("properties") or {}).items():
        names.add(name)
        names |= schema_fields(schema, sub, seen)
    if isinstance(node.get("items"), dict):
        names |= schema_fields(schema, node["items"], seen)
    return names


@pytest.mark.parametrize("schema_file", ["catalog.schema.json", "environment.schema.json"])
def test_every_schema_field_is_documented(schema_file: str) -> None:
    schema = json.loads((REPO / "environments" / "schema" / schema_file).read_text())
    fields = schema_fields(schema, schema)
    assert {"version", "template" if schema_file.startswith("environment") else "templates"} <= fields
    text = CONFIGURATION.read_text()
    # A field is documented when the page names it in code: `disk`, or within a path (`environment.team`).
    missing = sorted(f for f in fields if f"`{f}`" not in text and f".{f}`" not in text and f"`{f}." not in text)
    assert not missing, f"{schema_file} fields missing from docs/configuration.md: {missing}"


def test_readme_points_to_the_docs() -> None:
    readme = (REPO / "README.md").read_text()
    for page in ("docs/usage.md", "docs/configuration.md", "docs/cli.md"):
        assert f"]({page})" in readme, f"README.md does not link {page}"


# --- the static site -----------------------------------------------------------------------------

def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], capture_output=True, text=True, timeout=120, check=False)


class AssetParser(HTMLParser):
    """Collects the scripts and stylesheets a page loads, and any inline script or event-handler attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.inline_scripts = 0
        self.handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        if tag == "script":
            if values.get("src"):
                self.sources.append(values["src"] or "")
            elif values.get("type") not in ("application/json",):
                self._in_script = True
        if tag == "link" and values.get("rel") in ("stylesheet", "icon", "shortcut icon", "preload"):
            self.sources.append(values.get("href") or "")
        if tag in ("img", "iframe", "source") and values.get("src"):
            self.sources.append(values["src"] or "")

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


def test_site_builds_strictly_and_works_offline_under_the_csp(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = mkdocs_build(REPO / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr
    for name in ("index.html", "usage/index.html", "configuration/index.html", "cli/index.html", "search/search_index.json"):
        assert (site / name).is_file(), name

    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 7
    for page in pages:
        parser = AssetParser()
        parser.feed(page.read_text())
        where = page.relative_to(site)
        assert parser.inline_scripts == 0, f"{where}: inline <script> (blocked by script-src 'self')"
        assert not parser.handlers, f"{where}: event-handler attributes {parser.handlers}"
        remote = [src for src in parser.sources if "//" in src or src.startswith("data:")]
        assert not remote, f"{where}: loads from another origin (the docs must work offline): {remote}"
        for src in parser.sources:
            # 404.html links from the site's root ("/js/…"): it is served for any path.
            path = site / src.lstrip("/") if src.startswith("/") else page.parent / src
            assert path.with_name(path.name.split("?")[0]).resolve().is_file(), f"{where}: {src} is not in the site"
    # CSS may pull fonts and images too: only from the site itself.
    for css in site.rglob("*.css"):
        assert "url(http" not in css.read_text().replace(" ", ""), css
        assert "@import" not in css.read_text(), css


def test_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """The --strict build really is strict for links: break one in a copy and the build fails, naming it."""
    for name in ("mkdocs.yml",):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copytree(REPO / "docs_theme", tmp_path / "docs_theme")
    usage = tmp_path / "docs" / "usage.md"
    usage.write_text(usage.read_text() + "\nSee [the missing page](no-such-page.md) and [an anchor](cli.md#no-such-heading).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr and "no-such-heading" in result.stderr, result.stderr


# --- served by LSL -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_site() -> Path:
    """site/ as `make docs` leaves it (make test builds it first); built here when missing."""
    if not (SITE / "index.html").is_file():
        result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet"], cwd=REPO,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
    return SITE


def test_lsl_serves_the_docs_site(built_site: Path, live_server_proc: Any) -> None:
    base = f"{live_server_proc.url}/docs/"
    index = requests.get(base, timeout=10)
    assert index.status_code == 200 and index.headers["Content-Type"].startswith("text/html")
    assert "<title>LSL documentation</title>" in index.text and 'href="usage/"' in index.text
    # The same policy as every LSL page: scripts from this origin only.
    policy = index.headers.get("Content-Security-Policy", "")
    assert "script-src 'self'" in policy and "default-src 'self'" in policy, policy

    usage = requests.get(f"{base}usage/", timeout=10)
    assert usage.status_code == 200 and "Share with a teammate" in usage.text
    configuration = requests.get(f"{base}configuration/", timeout=10)
    assert configuration.status_code == 200 and "LSL_MAX_REQUEST_BYTES" in configuration.text

    # A page's URL without its slash is redirected, so its relative links (../cli/) resolve.
    bare = requests.get(f"{base}usage", timeout=10, allow_redirects=False)
    assert bare.status_code in (301, 302) and bare.headers["Location"].endswith("/docs/usage/")
    root = requests.get(f"{live_server_proc.url}/docs", timeout=10, allow_redirects=False)
    assert root.status_code in (301, 302) and root.headers["Location"].endswith("/docs/")

    script = requests.get(f"{base}js/lsl-init.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    search = requests.get(f"{base}search/search_index.json", timeout=10)
    assert search.status_code == 200 and search.json()["docs"]

    for missing in ("no-such-page/", "../lsl_site/settings.py", "%2e%2e/lsl_site/settings.py", ".hidden"):
        answer = requests.get(base + missing, timeout=10, allow_redirects=False)
        assert answer.status_code == 404, (missing, answer.status_code)
        assert "SECRET_KEY" not in answer.text


def test_compose_has_a_docs_service_built_from_the_same_sources() -> None:
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    docs = compose["services"]["docs"]
    dockerfile = REPO / docs["build"]["dockerfile"]
    text = dockerfile.read_text()
    # The image builds what `make docs` builds, as strictly, with the version requirements-dev.txt pins.
    for source in ("mkdocs.yml", "docs", "docs_theme", "requirements-dev.txt"):
        assert f"COPY {source} " in text, f"{dockerfile.name} does not copy {source}"
    assert "mkdocs build --strict" in text
    assert "volumes" not in docs and "docker.sock" not in json.dumps(docs)  # static files: no socket, no data


def test_docs_pages_run_under_the_csp_in_chromium(built_site: Path, live_server_proc: Any) -> None:
    """In a real browser under LSL's policy: no violation or script error, the theme's script ran (its
    globals come from js/lsl-init.js, not an inline script), and search (a web worker) finds a page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from tests.browser import SCREENSHOTS, Browser

    browser = Browser(live_server_proc.url)
    try:
        browser.get("/docs/usage/")
        browser.wait(lambda d: d.execute_script("return document.readyState") == "complete", what="the page loaded")
        assert browser.driver.title == "Usage - LSL documentation"
        assert browser.driver.execute_script("return typeof base_url === 'string' && base_url") == ".."
        # base.js builds the keyboard-shortcut help from `shortcuts`: proof it ran with lsl-init.js's values.
        assert browser.driver.execute_script(
            "return document.querySelector('.search.shortcut kbd').textContent") == "s"

        browser.css('a[data-bs-target="#mkdocs_search_modal"]').click()
        box = browser.wait(lambda d: d.find_element(By.ID, "mkdocs-search-query").is_displayed()
                           and d.find_element(By.ID, "mkdocs-search-query"), what="the search box")
        box.send_keys("snapshot")  # results come as you type (Enter would submit the form: a reload)

        def results(driver: Any) -> Any:
            # The box listens for keys only once the worker has built its index: until then, press a key
            # that changes nothing (End) again, as a person would go on typing.
            found = driver.find_elements(By.CSS_SELECTOR, "#mkdocs-search-results article a")
            if not found:
                box.send_keys(Keys.END)
            return found

        browser.wait(results, what="search results")
        links = [a.get_attribute("href") for a in browser.driver.find_elements(By.CSS_SELECTOR, "#mkdocs-search-results a")]
        assert any(link.startswith(f"{live_server_proc.url}/docs/usage/") for link in links), links
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.driver.save_screenshot(str(SCREENSHOTS / "docs-search.png"))

        errors = [entry["message"] for entry in browser.driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors  # a blocked inline script or remote load is logged here
    finally:
        browser.quit()
