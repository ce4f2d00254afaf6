"""Signal receivers of the accounts app (connected in AccountsConfig.ready)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.signals import user_logged_in
from django.dispatch import receiver

from accounts.security import client_ip, forget_failures


@receiver(user_logged_in, dispatch_uid="accounts.forget_login_failures")
def forget_login_failures(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """A page log-in with the right password clears that user name's failures from that address."""
    if request is not None:
        forget_failures(username=user.get_username(), ip=client_ip(request))
