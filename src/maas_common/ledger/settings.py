"""The ledger database's configuration, as both servers read it (`ledger:` in maas-ratelimit's
file, where it is written; `usage:` in maas-authz's, where the operator API reads it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from maas_common.config import PositiveDuration, StrictModel, password_reader, resolve_path
from maas_common.ledger.database import LedgerDatabase, open_ledger, sqlite_path
from maas_common.postgres import has_password


class LedgerDatabaseSection(StrictModel):
    # sqlite:///ledger.db (relative to the config file) or sqlite:////abs/path, or
    # postgresql://user@host:5432/db with the password in password_file (never in the URL)
    url: str
    password_file: Path | None = None
    timeout: PositiveDuration = 5.0  # per database operation, the wait for a connection included
    max_connections: int = Field(4, ge=1, le=64)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("sqlite:"):
            sqlite_path(value)  # names a file, or ValueError saying how
            return value
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///path or a postgresql:// URL")
        if has_password(value):
            raise ValueError("keep the password out of the URL: use password_file")
        return value

    @property
    def engine(self) -> str:
        """sqlite or postgresql, from the URL (nothing opened)."""
        return "sqlite" if self.url.startswith("sqlite:") else "postgresql"

    def open(self, base_dir: Path, application_name: str) -> LedgerDatabase:
        return open_ledger(
            self.url,
            base_dir=base_dir,
            timeout=self.timeout,
            max_connections=self.max_connections,
            password=(
                password_reader(resolve_path(base_dir, self.password_file))
                if self.password_file
                else lambda: None
            ),
            application_name=application_name,
        )
