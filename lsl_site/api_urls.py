from django.http import HttpRequest, JsonResponse
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt  # a POST to no route is a 404, not CsrfViewMiddleware's HTML 403
def not_found(request: HttpRequest, *args: object) -> JsonResponse:
    """No API route matches: a 404 in the API's JSON error shape, not the HTML page. Only paths ending in
    a slash land here, so CommonMiddleware still redirects `/api/v1/me` to `/api/v1/me/`."""
    return JsonResponse({"error": {"code": "not_found", "detail": "No such API endpoint or object."}}, status=404)


urlpatterns = [
    path("", include("accounts.urls")),
    path("", include("environments.urls")),
    path("", include("sessions.urls")),
    re_path(r"^[\s\S]*/$", not_found),  # last: after every real route (any character, newlines too)
]
