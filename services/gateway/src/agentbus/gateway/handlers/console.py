"""The web console: server-rendered pages, with live parts fed by server-sent events of HTML fragments.

Every page acts as the logged-in identity through the same use cases as the API; every form carries the
session's CSRF token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from urllib.parse import quote

from agentbus.contracts.approvals import ApprovalResolved
from agentbus.contracts.common import ID_PATTERN
from agentbus.contracts.tasks import TaskEvent
from agentbus.gateway.domain import ApprovalView, Identity, is_terminal, last_event_id, task_state
from agentbus.gateway.handlers.auth import (
    LOGIN_PATH,
    SESSION_IDENTITY,
    Context,
    check_csrf,
    console_identity,
    context,
    page_context,
    proxy_identity,
    sign_in,
)
from agentbus.gateway.service import InboxSnapshot, NewTask, TaskStreamStart
from fastapi import APIRouter, Depends, Form, Header, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

router = APIRouter(include_in_schema=False)

Person = Annotated[Identity, Depends(console_identity)]
Ctx = Annotated[Context, Depends(context)]
Csrf = Depends(check_csrf)
Tenant = Annotated[str, Path(pattern=ID_PATTERN)]
Id = Annotated[str, Path(pattern=ID_PATTERN)]
SEE_OTHER = 303


def _page(ctx: Context, request: Request, template: str, identity: Identity | None, **values: Any) -> HTMLResponse:
    return ctx.templates.TemplateResponse(request, template, page_context(request, identity, **values))


def _fragment(ctx: Context, request: Request, template: str, **values: Any) -> str:
    return ctx.templates.get_template(template).render(page_context(request, None, **values))


def _safe_next(path: str | None) -> str:
    """Only a path of this console: never another site."""
    return path if path and path.startswith("/") and not path.startswith("//") else "/"


@router.get("/")
def home(identity: Person) -> RedirectResponse:
    target = "/inbox" if identity.approves_for else "/tasks" if identity.submits_for else "/cost"
    return RedirectResponse(target, status_code=SEE_OTHER)


@router.get(LOGIN_PATH, response_class=HTMLResponse)
def login_page(request: Request, ctx: Ctx, next_path: Annotated[str | None, Query(alias="next")] = None) -> Response:
    if proxy_identity(request, ctx) is not None:
        return RedirectResponse(_safe_next(next_path), status_code=SEE_OTHER)
    return _page(ctx, request, "login.html", None, next_path=_safe_next(next_path), error=None)


@router.post(LOGIN_PATH, dependencies=[Csrf], response_class=HTMLResponse)
def login(
    request: Request,
    ctx: Ctx,
    name: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next_path: Annotated[str, Form(alias="next")] = "/",
) -> Response:
    identity = ctx.directory.identity(name.strip())
    if identity is None or not ctx.directory.verify_password(identity.name, password):
        response = _page(
            ctx,
            request,
            "login.html",
            None,
            next_path=_safe_next(next_path),
            error="Unknown identity or wrong password.",
        )
        response.status_code = 401
        return response
    sign_in(request, identity)
    return RedirectResponse(_safe_next(next_path), status_code=SEE_OTHER)


@router.post("/logout", dependencies=[Csrf])
def logout(request: Request) -> RedirectResponse:
    request.session.pop(SESSION_IDENTITY, None)
    return RedirectResponse(LOGIN_PATH, status_code=SEE_OTHER)


# --- inbox ----------------------------------------------------------------------------------------------


@router.get("/inbox", response_class=HTMLResponse)
async def inbox(request: Request, identity: Person, ctx: Ctx) -> HTMLResponse:
    views = await ctx.service.inbox(identity) if identity.approves_for else []
    return _page(ctx, request, "inbox.html", identity, views=views)


@router.get("/inbox/stream", response_class=EventSourceResponse)
async def inbox_stream(request: Request, identity: Person, ctx: Ctx) -> AsyncIterator[ServerSentEvent]:
    async for change in ctx.service.watch_inbox(identity):
        if isinstance(change, InboxSnapshot):
            html = _fragment(ctx, request, "_approvals.html", views=change.approvals)
            yield ServerSentEvent(raw_data=html, event="snapshot")
        elif isinstance(change, ApprovalView):
            html = _fragment(ctx, request, "_approval.html", view=change)
            yield ServerSentEvent(raw_data=html, event="pending")
        elif isinstance(change, ApprovalResolved):
            yield ServerSentEvent(raw_data=change.model_dump_json(), event="resolved")


@router.post("/approvals/{tenant}/{approval_id}/decision", dependencies=[Csrf], response_class=HTMLResponse)
async def decide(
    request: Request,
    identity: Person,
    ctx: Ctx,
    tenant: Tenant,
    approval_id: Id,
    decision: Annotated[Literal["approve", "deny"], Form()],
    arguments_sha256: Annotated[str, Form()],
    reason: Annotated[str, Form()] = "",
) -> HTMLResponse:
    outcome = await ctx.service.decide(identity, approval_id, decision, arguments_sha256, reason.strip(), tenant)
    may_follow = outcome.request.tenant in identity.submits_for
    return _page(ctx, request, "decision.html", identity, outcome=outcome, may_follow=may_follow)


# --- tasks ----------------------------------------------------------------------------------------------


@router.get("/tasks", response_class=HTMLResponse)
def tasks_page(request: Request, identity: Person, ctx: Ctx) -> HTMLResponse:
    return _page(ctx, request, "tasks.html", identity)


@router.post("/tasks", dependencies=[Csrf])
async def submit(
    identity: Person,
    ctx: Ctx,
    tenant: Annotated[str, Form()],
    agent: Annotated[str, Form()],
    task_input: Annotated[str, Form(alias="input")],
) -> RedirectResponse:
    submitted = await ctx.service.submit_task(identity, NewTask(tenant=tenant, agent=agent.strip(), input=task_input))
    task = submitted.task
    return RedirectResponse(f"/tasks/{task.tenant}/{task.task_id}", status_code=SEE_OTHER)


@router.get("/tasks/open")
def open_task(
    identity: Person,
    tenant: Annotated[str, Query(pattern=ID_PATTERN)],
    task_id: Annotated[str, Query(pattern=ID_PATTERN)],
) -> RedirectResponse:
    return RedirectResponse(f"/tasks/{tenant}/{quote(task_id)}", status_code=SEE_OTHER)


@router.get("/tasks/{tenant}/{task_id}", response_class=HTMLResponse)
async def task_page(request: Request, identity: Person, ctx: Ctx, tenant: Tenant, task_id: Id) -> HTMLResponse:
    start = await ctx.service.open_task_stream(identity, task_id, tenant, 0)
    events = await ctx.service.stored_events(start)
    state = task_state(events)
    return _page(ctx, request, "task.html", identity, tenant=tenant, task_id=task_id, events=events, state=state)


@router.get("/tasks/{tenant}/{task_id}/stream", response_class=EventSourceResponse)
async def task_stream(
    request: Request,
    identity: Person,
    ctx: Ctx,
    tenant: Tenant,
    task_id: Id,
    after: Annotated[int, Query(ge=0)] = 0,
    last_event: Annotated[str | None, Header(alias="Last-Event-ID", pattern=r"^[0-9]{1,15}$")] = None,
) -> AsyncIterator[ServerSentEvent]:
    # A reconnecting browser says where it was; a fresh page, through `after`, what it showed already.
    after_seq = last_event_id(last_event) if last_event is not None else after
    start = TaskStreamStart(identity.reader(tenant), tenant, task_id, after_seq, ended=False)
    async for event in ctx.service.follow_task(start):
        yield _event_frame(ctx, request, event)


def _event_frame(ctx: Context, request: Request, event: TaskEvent) -> ServerSentEvent:
    if event.kind == "token":
        return ServerSentEvent(raw_data=json.dumps(event.text), event="token")
    html = _fragment(ctx, request, "_event.html", event=event)
    return ServerSentEvent(raw_data=html, event="terminal" if is_terminal(event) else "event", id=str(event.seq))


@router.post("/tasks/{tenant}/{task_id}/cancel", dependencies=[Csrf])
async def cancel(
    identity: Person, ctx: Ctx, tenant: Tenant, task_id: Id, reason: Annotated[str, Form()] = ""
) -> RedirectResponse:
    await ctx.service.cancel_task(identity, task_id, tenant, reason.strip() or None)
    return RedirectResponse(f"/tasks/{tenant}/{task_id}", status_code=SEE_OTHER)


# --- operators ------------------------------------------------------------------------------------------


@router.get("/cost", response_class=HTMLResponse)
async def cost(
    request: Request, identity: Person, ctx: Ctx, tenant: Annotated[str | None, Query(pattern=ID_PATTERN)] = None
) -> HTMLResponse:
    overview = await ctx.service.costs(identity, tenant or None)
    return _page(ctx, request, "cost.html", identity, overview=overview)


@router.get("/health", response_class=HTMLResponse)
async def health(request: Request, identity: Person, ctx: Ctx) -> HTMLResponse:
    return _page(ctx, request, "health.html", identity, health=await ctx.service.health(identity))
