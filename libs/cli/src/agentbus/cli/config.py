"""Where the CLI finds NATS and who it connects as.

The URL: --nats-url, then $AGENTBUS_NATS_URL, then ./.agentbus/env, then the default. Credentials: when
`agentbus up` enforces identities it writes AGENTBUS_CREDENTIALS_DIR and AGENTBUS_IDENTITIES_FILE to
./.agentbus/env (each may also be set in the environment); without them the CLI connects anonymously,
as to a server started with `agentbus up --nats-url` or any server without authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import click
import nats.errors
import nats.js.errors
import structlog
from agentbus.cli.identities import (
    ADMIN_USER,
    Credential,
    CredentialStore,
    Identities,
    IdentityError,
    load_identities,
    submitter_user,
)
from agentbus.runtime.connection import connect_nats
from agentbus.runtime.logging import configure_logging
from nats.aio.client import Client as NatsClient

T = TypeVar("T")

STATE_DIR = Path(".agentbus")
ENV_FILE_NAME = "env"
NATS_URL_VARIABLE = "AGENTBUS_NATS_URL"
NATS_MONITOR_URL_VARIABLE = "AGENTBUS_NATS_MONITOR_URL"
CREDENTIALS_DIR_VARIABLE = "AGENTBUS_CREDENTIALS_DIR"
IDENTITIES_FILE_VARIABLE = "AGENTBUS_IDENTITIES_FILE"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

PERMISSIONS_VIOLATION = "permissions violation"
AUTHORIZATION_VIOLATION = "authorization violation"


def read_env_file(state_dir: Path = STATE_DIR) -> dict[str, str]:
    """The KEY=VALUE lines `agentbus up` wrote, or nothing when it has not run here."""
    path = state_dir / ENV_FILE_NAME
    if not path.exists():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            values[key.strip()] = value.strip()
    return values


def write_env_file(values: dict[str, str], state_dir: Path = STATE_DIR) -> Path:
    """Write KEY=VALUE lines for every other command to read."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / ENV_FILE_NAME
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")
    return path


def _setting(variable: str, state_dir: Path) -> str | None:
    return os.environ.get(variable) or read_env_file(state_dir).get(variable) or None


def resolve_nats_url(explicit: str | None, state_dir: Path = STATE_DIR) -> str:
    if explicit:
        return explicit
    return _setting(NATS_URL_VARIABLE, state_dir) or DEFAULT_NATS_URL


def resolve_credentials(state_dir: Path = STATE_DIR) -> CredentialStore | None:
    """The credentials `agentbus up` wrote, or None when the server needs none."""
    directory = _setting(CREDENTIALS_DIR_VARIABLE, state_dir)
    return CredentialStore(Path(directory)) if directory else None


def resolve_identities(state_dir: Path = STATE_DIR) -> Identities | None:
    """The identities the server enforces, or None when it enforces none."""
    path = _setting(IDENTITIES_FILE_VARIABLE, state_dir)
    return load_identities(Path(path)) if path else None


def credential_of(user: str, state_dir: Path = STATE_DIR) -> Credential | None:
    """The stored credential of NATS user `user`; None when the server needs no credentials.

    A usage error when credentials are in use but `user` has none (not declared in the identities file).
    """
    try:
        store = resolve_credentials(state_dir)
        if store is None:
            return None
        credential = store.get(user)
    except IdentityError as exc:
        raise click.UsageError(str(exc)) from exc
    if credential is None:
        raise click.UsageError(
            f"no credentials for NATS user {user!r} in {store.directory}; declare it in identities.yaml "
            "and restart `agentbus up`"
        )
    return credential


def admin_credential(state_dir: Path = STATE_DIR) -> Credential | None:
    """The operator's credential (status, streams, replays across tenants)."""
    return credential_of(ADMIN_USER, state_dir)


class RefusedByServerError(click.ClickException):
    """NATS refused something the command did: a permission it lacks, or its credentials."""


class _ServerErrors:
    """Asynchronous errors the server reports on a connection, turned into a failure of the command.

    A publish the server refuses does not raise at the publisher (the message is dropped and an error
    arrives separately), so the command races its work against the first refusal.
    """

    def __init__(self) -> None:
        self.last: str | None = None
        self.refused = asyncio.Event()

    async def record(self, error: Exception) -> None:
        text = str(error)
        if PERMISSIONS_VIOLATION in text.lower() or AUTHORIZATION_VIOLATION in text.lower():
            self.last = text
            self.refused.set()

    async def guard(self, work: Awaitable[T]) -> T:
        work_task = asyncio.ensure_future(work)
        refusal = asyncio.ensure_future(self.refused.wait())
        try:
            await asyncio.wait({work_task, refusal}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            await _cancel(work_task)
            raise
        finally:
            refusal.cancel()
        if self.refused.is_set():
            await _cancel(work_task)
            raise RefusedByServerError(f"refused by NATS: {self.last}")
        return work_task.result()


async def _cancel(task: asyncio.Future[T]) -> None:
    # The work ends while the connection is still open, so its own clean-up (unsubscribing) can run.
    task.cancel()
    with contextlib.suppress(BaseException):
        await task


CONNECTION_LOST_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.ConnectionDrainingError,
    ConnectionError,
)
"""What a command sees when the server goes away under it (a stopped `agentbus up`)."""


async def _connect(url: str, credential: Credential | None, errors: _ServerErrors | None = None) -> NatsClient:
    user = credential.user if credential else None
    try:
        return await connect_nats(
            url,
            "agentbus-cli",
            user=user,
            password=credential.password if credential else None,
            reconnect_forever=False,
            error_cb=errors.record if errors is not None else None,
        )
    except (nats.errors.NoServersError, OSError) as exc:
        if errors is not None and errors.last is not None:
            raise RefusedByServerError(f"NATS at {url} refused user {user!r}: {errors.last}") from exc
        raise click.ClickException(f"cannot reach NATS at {url}. Is `agentbus up` running?") from exc


async def open_connection(url: str | None, credential: Credential | None) -> NatsClient:
    """A second connection inside a `run_nats` action (as another user); the caller closes it."""
    return await _connect(resolve_nats_url(url), credential)


def run_nats(url: str | None, credential: Credential | None, action: Callable[[NatsClient], Awaitable[T]]) -> T:
    """Connect as `credential` (anonymously when None), run `action`, close. Whatever goes wrong becomes one
    clear line (a click.ClickException, exit 1): the server unreachable, the credentials rejected, a
    permission refused, nothing answering, or the connection lost under the command."""

    if not structlog.is_configured():
        # Invoked without the `agentbus` group (a command object run on its own): the NATS client's state
        # lines must not reach the command's output either.
        configure_logging("CRITICAL", "agentbus-cli")

    async def main() -> T:
        resolved = resolve_nats_url(url)
        errors = _ServerErrors()
        nc = await _connect(resolved, credential, errors)
        try:
            return await errors.guard(action(nc))
        except nats.js.errors.NotFoundError as exc:
            raise click.ClickException(f"not found on {resolved}: {exc}. Has `agentbus streams apply` run?") from exc
        except nats.errors.NoRespondersError as exc:
            raise click.ClickException(
                f"nothing on {resolved} answered: {exc}. Has `agentbus streams apply` run?"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise click.ClickException(f"NATS at {resolved} did not answer in time") from exc
        except CONNECTION_LOST_ERRORS as exc:
            raise click.ClickException(
                f"lost the connection to NATS at {resolved}: did `agentbus up` stop? (`agentbus doctor` tells)"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                await nc.close()

    return asyncio.run(main())


def submitter_credential(
    tenant: str, submitter: str | None, state_dir: Path = STATE_DIR
) -> tuple[Credential | None, str | None]:
    """Who submits for `tenant`: the named submitter, or the tenant's first one; None when identities are
    not enforced. A usage error when the submitter may not submit for the tenant."""
    try:
        identities = resolve_identities(state_dir)
    except IdentityError as exc:
        raise click.UsageError(str(exc)) from exc
    if identities is None:
        return None, submitter
    members = identities.tenants.get(tenant)
    allowed = members.submitters if members else ()
    if submitter is None:
        if not allowed:
            raise click.UsageError(f"tenant {tenant!r} has no submitter in the identities file")
        submitter = allowed[0]
    elif submitter not in allowed:
        raise click.UsageError(f"{submitter!r} is not a submitter of tenant {tenant!r} in the identities file")
    return credential_of(submitter_user(submitter), state_dir), submitter
