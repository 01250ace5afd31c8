"""Bearer tokens of the HTTP API: the identity's name, signed and dated with the gateway's secret, so the
gateway stores nothing. Rotating the secret revokes every token (and every console session)."""

from __future__ import annotations

from datetime import datetime, timedelta

from agentbus.contracts.common import utc_now
from itsdangerous import BadSignature, URLSafeTimedSerializer

TOKEN_SALT = "agentbus-gateway-api-token"  # noqa: S105 - separates token signatures from session ones


class TokenSigner:
    def __init__(self, secret: str, max_age_seconds: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt=TOKEN_SALT)
        self.max_age_seconds = max_age_seconds

    def issue(self, identity: str) -> tuple[str, datetime]:
        """A token for `identity` and when it expires."""
        return str(self._serializer.dumps({"sub": identity})), utc_now() + timedelta(seconds=self.max_age_seconds)

    def identity_of(self, token: str) -> str | None:
        """The identity a valid, unexpired token names; None otherwise."""
        try:
            claims = self._serializer.loads(token, max_age=self.max_age_seconds)
        except BadSignature:
            return None
        subject = claims.get("sub") if isinstance(claims, dict) else None
        return subject if isinstance(subject, str) else None
