"""Identities from the identities file `agentbus up` enforces, and the credentials of their NATS users.

The file names tenants with their submitters and approvers; `agentbus up` gives each name a NATS user
(`submitter-<name>`, `approver-<name>`) and writes `<user>.json` with its password and inbox prefix into the
credentials folder. The gateway connects as those users, so nats-server holds every action to the user's
own permissions.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from agentbus.gateway.domain import Actor, Identity, Role
from agentbus.runtime.connection import inbox_prefix_for
from agentbus.runtime.errors import ConfigurationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ADMIN_USER = "admin"


def nats_user(actor: Actor) -> str:
    """The NATS user of an identity's role, as `agentbus up` names it."""
    return f"{actor.role.value}-{actor.name}"


class _Members(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    submitters: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()


class _IdentitiesFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenants: dict[str, _Members] = Field(default_factory=dict)


def load_identities(path: Path, operators: list[str]) -> dict[str, Identity]:
    """Every identity of the file, plus the operators it does not name; ConfigurationError when unreadable."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        parsed = _IdentitiesFile.model_validate(raw or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigurationError(f"identities file {path}: {exc}") from exc
    submits: dict[str, list[str]] = {}
    approves: dict[str, list[str]] = {}
    for tenant, members in parsed.tenants.items():
        for name in members.submitters:
            submits.setdefault(name, []).append(tenant)
        for name in members.approvers:
            approves.setdefault(name, []).append(tenant)
    names = dict.fromkeys([*submits, *approves, *operators])
    return {
        name: Identity(
            name=name,
            submits_for=tuple(submits.get(name, ())),
            approves_for=tuple(approves.get(name, ())),
            operator=name in operators,
        )
        for name in names
    }


@dataclass(frozen=True)
class Credential:
    user: str
    password: str
    inbox_prefix: str


class CredentialsFolder:
    """`<user>.json` files: {user, password, inbox_prefix}. Read when needed, so a rotated password is used
    from the next connection on."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def get(self, user: str) -> Credential | None:
        path = self.directory / f"{user}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Credential(
                user=str(data["user"]),
                password=str(data["password"]),
                inbox_prefix=str(data.get("inbox_prefix") or inbox_prefix_for(str(data["user"]))),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None


class FileDirectory:
    """The identities of the identities file; a password proves an identity when it is the password of one of
    its own NATS users (for an operator the file does not name, such as `admin`, the user of that name)."""

    def __init__(self, identities: dict[str, Identity], credentials: CredentialsFolder) -> None:
        self._identities = identities
        self._credentials = credentials

    def identity(self, name: str) -> Identity | None:
        return self._identities.get(name)

    def verify_password(self, name: str, password: str) -> bool:
        identity = self._identities.get(name)
        if identity is None or not password:
            return False
        users = [nats_user(Actor(name, Role.SUBMITTER))] if identity.submits_for else []
        users += [nats_user(Actor(name, Role.APPROVER))] if identity.approves_for else []
        if identity.operator and not identity.tenants:
            users.append(name)
        matched = False
        for user in users:
            credential = self._credentials.get(user)
            if credential is not None and hmac.compare_digest(credential.password.encode(), password.encode()):
                matched = True
        return matched
