from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from lsl_site.docs_site import docs_page

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves Swagger UI's init script as its own request (/api/docs/?script=), so the page
    # needs no inline script under the Content-Security-Policy; Swagger UI itself comes from the sidecar app.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/v1/", include("lsl_site.api_urls")),
    # The documentation website, built from docs/ by MkDocs (`make docs`): lsl_site/docs_site.py.
    re_path(r"^docs/(?P<path>.*)$", docs_page, name="docs"),
    path("", include("frontend.urls")),
]
