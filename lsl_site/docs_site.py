"""/docs/: the documentation website (MkDocs, built from docs/ by `make docs` into site/).

The site is static files built ahead of time, so serving it needs nothing at run time but the files.
It is public, like the docs in the repository: no page in it holds anything a visitor may not see.
Responses go through the same middleware as every page (Content-Security-Policy included; the theme is
set up to need no inline script and nothing from another origin: mkdocs.yml, docs_theme/).
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseNotFound, HttpResponseRedirect
from django.utils._os import safe_join
from django.views.decorators.http import require_safe
from django.views.static import serve

SITE_DIR = Path(settings.BASE_DIR) / "site"


@require_safe
def docs_page(request: HttpRequest, path: str = "") -> HttpResponse:
    if not (SITE_DIR / "index.html").is_file():
        # Said plainly rather than a bare 404: the one fix is a build step the operator skipped.
        return HttpResponseNotFound("The documentation site is not built on this server: run `make docs` "
                                    "(mkdocs build) in the LSL checkout.\n", content_type="text/plain")
    # Hidden files (a stamp, an editor's swap file) are not part of the site.
    if any(part.startswith(".") for part in path.split("/")):
        return HttpResponseNotFound("Not found.\n", content_type="text/plain")
    try:
        target = Path(safe_join(SITE_DIR, path))  # refuses anything resolving outside the site (.., symlinks)
    except ValueError:
        return HttpResponseNotFound("Not found.\n", content_type="text/plain")
    if target.is_dir():
        if path and not path.endswith("/"):
            # MkDocs' pages link relatively (../cli/): a page's URL must end in a slash for them to resolve.
            return HttpResponseRedirect(request.path + "/")
        path = f"{path}index.html"
    return serve(request, path, document_root=str(SITE_DIR))
