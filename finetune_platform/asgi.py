"""ASGI entry point for daphne: HTTP goes to Django, WebSockets to Channels consumers.

WebSockets pass the allowed-hosts origin check (cross-site WebSocket hijacking:
``core.live.sockets.OriginCheck``) and the session auth middleware; each consumer then authorises its
own object.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "finetune_platform.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402 - needs the app registry
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from core.live.sockets import OriginCheck  # noqa: E402
from finetune_platform.routing import websocket_urlpatterns  # noqa: E402
from tasks.uploads import UploadBodyCap  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": UploadBodyCap(django_asgi_app),  # a too-large dataset upload is refused before its body
        "websocket": OriginCheck(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
