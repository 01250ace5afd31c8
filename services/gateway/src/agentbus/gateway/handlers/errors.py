"""Errors as the caller expects them: JSON problems on the API, pages in the console."""

from __future__ import annotations

from urllib.parse import urlencode

from agentbus.gateway.domain import (
    ForbiddenError,
    GatewayError,
    InvalidRequestError,
    NotAuthenticatedError,
    NotFoundError,
    UnavailableError,
)
from agentbus.gateway.handlers.auth import LOGIN_PATH, LoginRequiredError, context, page_context
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException

API_PREFIX = "/v1"
STATUS: dict[type[GatewayError], int] = {
    NotAuthenticatedError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    InvalidRequestError: 400,
    UnavailableError: 503,
}


def _is_api(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIX)


def _error_page(request: Request, status: int, message: str) -> Response:
    ctx = context(request)
    response = ctx.templates.TemplateResponse(
        request, "error.html", page_context(request, None, status=status, message=message)
    )
    response.status_code = status
    return response


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    if _is_api(request):
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)
    if status == 401:
        return RedirectResponse(f"{LOGIN_PATH}?{urlencode({'next': request.url.path})}", status_code=303)
    return _error_page(request, status, exc.message)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequiredError)
    return RedirectResponse(f"{LOGIN_PATH}?{urlencode({'next': exc.next_path})}", status_code=303)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _is_api(request) or exc.status_code < 400:
        return await http_exception_handler(request, exc)
    return _error_page(request, exc.status_code, str(exc.detail))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    if _is_api(request):
        return await request_validation_exception_handler(request, exc)
    fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) or "request" for e in exc.errors())
    return _error_page(request, 422, f"The form is incomplete or invalid: {fields}.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(LoginRequiredError, _login_required)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
