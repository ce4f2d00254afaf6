from django.contrib import admin
from django.contrib.auth.decorators import login_required
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

urlpatterns = [
    path("", include("tasks.urls")),
    path("", include("gpus.urls")),  # /gpus/ and /queue/
    path("accounts/", include("accounts.urls")),
    path("deployments/", include("deployments.urls")),
    path("usage/", include("usage.urls")),
    path("admin/", admin.site.urls),
    path("api/auth/", include("accounts.api.urls")),
    path("api/finetuning/", include("tasks.api.urls")),
    path("api/gpus/", include("gpus.api.urls")),
    path("api/deployments/", include("deployments.api.urls")),
    path("api/usage/", include("usage.api_urls")),
    # Like every page, the API's description needs a log-in: the schema answers 401 without one
    # (SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"]), the two HTML viewers send a visitor to the log-in page.
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", login_required(SpectacularSwaggerView.as_view(url_name="schema")), name="api-docs"),
    path("api/redoc/", login_required(SpectacularRedocView.as_view(url_name="schema")), name="api-redoc"),
    path("api/browse/", include("rest_framework.urls")),
    path("finetuning/", include("tasks.api.compat_urls")),
    path("i18n/", include("django.conf.urls.i18n")),  # set_language: the language switcher
]
