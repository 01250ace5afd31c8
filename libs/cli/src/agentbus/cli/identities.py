"""Who may use the bus: tenants with their submitters and approvers, and each NATS user's password.

`agentbus up` reads `identities.yaml` from its state directory (writing a demo one when absent), gives
every identity a NATS user, and keeps one credentials file per user under `credentials/` (mode 0600).
Passwords are generated once and kept, so re-running `up` never invalidates a credential in use.

NATS user names: `admin` (the bootstrap and operator commands), `service-<service>` for each service,
`submitter-<name>` and `approver-<name>` for people and applications.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from agentbus.contracts.common import Identifier
from agentbus.runtime.connection import inbox_prefix_for
from agentbus.runtime.server import write_private_file
from pydantic import BaseModel, ConfigDict, Field, ValidationError

IDENTITIES_FILE_NAME = "identities.yaml"
CREDENTIALS_DIR_NAME = "credentials"
ADMIN_USER = "admin"
PASSWORD_BYTES = 24

DEFAULT_IDENTITIES_YAML = """\
# Who may use this agentbus. `agentbus up` gives each name a NATS user whose permissions the server
# enforces, and writes its password to credentials/<user>.json (mode 0600) beside this file.
#   submitters: may submit and cancel tasks, ingest documents, and read task events of their tenants.
#   approvers:  may read pending approvals of their tenants and publish decisions only as themselves.
# Names match [A-Za-z0-9_-]{1,64}. Edit, then restart `agentbus up`; existing passwords are kept.
tenants:
  acme:
    submitters: [acme-app]
    approvers: [alice, bob]
"""


class IdentityError(ValueError):
    """The identities file or a credential is missing or invalid."""


class TenantMembers(BaseModel):
    """The submitters and approvers of one tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    submitters: tuple[Identifier, ...] = Field(default=(), description="May submit tasks for this tenant.")
    approvers: tuple[Identifier, ...] = Field(default=(), description="May decide this tenant's approvals.")


class Identities(BaseModel):
    """Every tenant and its members. A name listed under several tenants has the rights of each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[Identifier, TenantMembers] = Field(default_factory=dict)

    def approvers(self) -> dict[str, tuple[str, ...]]:
        """Each approver and the tenants it approves for."""
        return _members_by_name({t: m.approvers for t, m in self.tenants.items()})

    def submitters(self) -> dict[str, tuple[str, ...]]:
        """Each submitter and the tenants it submits for."""
        return _members_by_name({t: m.submitters for t, m in self.tenants.items()})


def _members_by_name(by_tenant: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    result: dict[str, list[str]] = {}
    for tenant, names in by_tenant.items():
        for name in names:
            result.setdefault(name, []).append(tenant)
    return {name: tuple(tenants) for name, tenants in result.items()}


def service_user(service: str) -> str:
    """The NATS user of a service."""
    return f"service-{service}"


def submitter_user(name: str) -> str:
    """The NATS user of a submitter."""
    return f"submitter-{name}"


def approver_user(name: str) -> str:
    """The NATS user of an approver."""
    return f"approver-{name}"


def load_identities(path: Path) -> Identities:
    """Read an identities file; IdentityError names the file and the field when it is invalid."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise IdentityError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return Identities.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise IdentityError(f"{path}: field '{field}': {first['msg']}") from exc


def load_or_create_identities(path: Path) -> Identities:
    """The identities in `path`, after writing the demo identities there if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DEFAULT_IDENTITIES_YAML, encoding="utf-8")
    return load_identities(path)


@dataclass(frozen=True)
class Credential:
    """A NATS user name and password."""

    user: str
    password: str


class CredentialStore:
    """One `<user>.json` file per NATS user in a directory only its owner can read."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_of(self, user: str) -> Path:
        return self.directory / f"{user}.json"

    def get(self, user: str) -> Credential | None:
        """The stored credential of `user`, or None when there is none."""
        path = self.path_of(user)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Credential(user=str(data["user"]), password=str(data["password"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{path}: unreadable credential: {exc}") from exc

    def ensure(self, user: str) -> Credential:
        """The credential of `user`, generating and storing a random password the first time."""
        existing = self.get(user)
        if existing is not None:
            return existing
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        credential = Credential(user=user, password=secrets.token_urlsafe(PASSWORD_BYTES))
        # The inbox prefix is part of the credential: the server lets this user read replies only there.
        fields = {"user": credential.user, "password": credential.password, "inbox_prefix": inbox_prefix_for(user)}
        write_private_file(self.path_of(user), json.dumps(fields) + "\n")
        return credential
