"""Who is asking: a bearer token (the API), a signed session cookie (the console), HTTP Basic with the password
of one of the identity's NATS users (to get a token), or the header of a trusted authenticating proxy.
Forms carry a CSRF token bound to the session."""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated, Any

from agentbus.gateway.adapters.tokens import TokenSigner
from agentbus.gateway.domain import Identity, NotAuthenticatedError
from agentbus.gateway.ports import Directory
from agentbus.gateway.service import GatewayService
from fastapi import Depends, Form, HTTPException, Request
from fastapi.templating import Jinja2Templates

SESSION_IDENTITY = "identity"
SESSION_CSRF = "csrf"
CSRF_FIELD = "csrf_token"
LOGIN_PATH = "/login"


@dataclass(frozen=True)
class Context:
    """What handlers share, built once by the composition root."""

    service: GatewayService
    directory: Directory
    tokens: TokenSigner
    templates: Jinja2Templates
    trusted_user_header: str | None


def context(request: Request) -> Context:
    found: Context = request.app.state.context
    return found


class LoginRequiredError(Exception):
    """A console page asked for without a session: the browser is sent to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def _known(ctx: Context, name: str | None) -> Identity | None:
    return ctx.directory.identity(name) if name else None


def proxy_identity(request: Request, ctx: Context) -> Identity | None:
    """The identity the trusted proxy's header names (None without the header, or when none is trusted)."""
    if ctx.trusted_user_header is None:
        return None
    name = request.headers.get(ctx.trusted_user_header)
    if name is None:
        return None
    identity = _known(ctx, name.strip())
    if identity is None:
        raise NotAuthenticatedError(f"{name.strip()!r} is not an identity of this agentbus")
    return identity


def api_identity(request: Request, ctx: Annotated[Context, Depends(context)]) -> Identity:
    """The identity of an API call: its bearer token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthenticatedError("send Authorization: Bearer <token> (POST /v1/tokens issues one)")
    identity = _known(ctx, ctx.tokens.identity_of(token.strip()))
    if identity is None:
        raise NotAuthenticatedError("the bearer token is invalid or expired")
    return identity


def basic_identity(request: Request, ctx: Annotated[Context, Depends(context)]) -> Identity:
    """The identity asking for a token: the trusted proxy's header, or HTTP Basic with the password of one of
    the identity's own NATS users."""
    proxied = proxy_identity(request, ctx)
    if proxied is not None:
        return proxied
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            name, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            name, password = "", ""
        if ctx.directory.verify_password(name, password):
            identity = _known(ctx, name)
            if identity is not None:
                return identity
    raise NotAuthenticatedError("send HTTP Basic with an identity and the password of one of its NATS users")


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use."""
    token = request.session.get(SESSION_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session[SESSION_CSRF] = token
    return token


def console_identity(request: Request, ctx: Annotated[Context, Depends(context)]) -> Identity:
    """The identity of a console page: the trusted proxy's header, else the session; else off to log in."""
    proxied = proxy_identity(request, ctx)
    if proxied is not None:
        if request.session.get(SESSION_IDENTITY) != proxied.name:
            request.session.clear()
            request.session[SESSION_IDENTITY] = proxied.name
        return proxied
    identity = _known(ctx, request.session.get(SESSION_IDENTITY))
    if identity is None:
        request.session.pop(SESSION_IDENTITY, None)
        raise LoginRequiredError(request.url.path)
    return identity


def check_csrf(request: Request, submitted: Annotated[str, Form(alias=CSRF_FIELD)] = "") -> None:
    """Every form posts the session's CSRF token: a page of another site cannot know it."""
    expected = request.session.get(SESSION_CSRF)
    if not isinstance(expected, str) or not hmac.compare_digest(expected.encode(), submitted.encode()):
        raise HTTPException(status_code=403, detail="the form is stale or did not come from this console: reload it")


def sign_in(request: Request, identity: Identity) -> None:
    """A new session for `identity`, with a new CSRF token (nothing from before the login carries over)."""
    request.session.clear()
    request.session[SESSION_IDENTITY] = identity.name
    csrf_token(request)


def page_context(request: Request, identity: Identity | None, **values: Any) -> dict[str, Any]:
    return {"request": request, "identity": identity, "csrf": csrf_token(request), **values}
