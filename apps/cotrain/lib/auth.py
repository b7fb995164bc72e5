"""Make MONAI Label 0.8.5's token check work with PyJWT 2.

MONAI Label 0.8.5 checks an access token with ``jwt.decode(token, key, options=...)``
(``monailabel/endpoints/user/auth.py``, ``from_token``) and passes no ``algorithms``. PyJWT 2
requires them, so with authentication on every token, valid or not, is refused (401: 'It is
required that you pass in a value for the "algorithms" argument'). :func:`accept_signed_tokens`
gives that module a ``jwt`` whose ``decode`` passes :data:`TOKEN_ALGORITHMS`; signature, expiry
and roles are still checked by PyJWT and MONAI Label as before.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jwt

logger = logging.getLogger(__name__)

#: Signature algorithms accepted for access tokens (Keycloak signs with RS256 by default);
#: ``MONAI_LABEL_AUTH_TOKEN_ALGORITHMS=RS256,ES256`` changes them.
TOKEN_ALGORITHMS = [
    a.strip()
    for a in os.environ.get("MONAI_LABEL_AUTH_TOKEN_ALGORITHMS", "RS256").split(",")
    if a.strip()
]


class _JWTWithAlgorithms:
    """PyJWT as MONAI Label's auth module uses it, with ``algorithms`` given to ``decode``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(jwt, name)

    @staticmethod
    def decode(token: str, key: Any, algorithms: list[str] | None = None, **kwargs: Any) -> Any:
        return jwt.decode(token, key, algorithms=algorithms or TOKEN_ALGORITHMS, **kwargs)


def accept_signed_tokens() -> None:
    """Patch MONAI Label's token check (see the module docstring); safe to call twice."""
    from monailabel.endpoints.user import auth

    if not isinstance(auth.jwt, _JWTWithAlgorithms):
        auth.jwt = _JWTWithAlgorithms()
        logger.info("access tokens: accepting %s signatures", ", ".join(TOKEN_ALGORITHMS))
