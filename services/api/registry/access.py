"""What admins set in the registry: bearer tokens (stored by their sha256) with their project
and role, per-project quotas that override the config file's; and the keys every replica
shares (`secret`)."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from services.api.config import Quota, Role
from services.api.tables import quotas, secrets_table, tokens
from services.db import Database, upsert


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    project: str
    role: Role
    description: str
    created_at: float


_TOKEN_COLUMNS = (
    tokens.c.id,
    tokens.c.project,
    tokens.c.role,
    tokens.c.description,
    tokens.c.created_at,
)


class Access:
    """Tokens, quotas and shared secrets."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add_token(
        self, token_sha256: str, project: str, role: Role, description: str
    ) -> TokenRecord:
        record = TokenRecord(uuid.uuid4().hex, project, role, description, time.time())
        with self.db.transaction() as cur:
            cur.execute(
                tokens.insert().values(
                    id=record.id,
                    token_sha256=token_sha256,
                    project=project,
                    role=role.value,
                    description=description,
                    created_at=record.created_at,
                )
            )
        return record

    def find_token(self, token_sha256: str) -> TokenRecord | None:
        with self.db.transaction() as cur:
            row = cur.execute(
                sa.select(*_TOKEN_COLUMNS).where(tokens.c.token_sha256 == token_sha256)
            ).first()
        return TokenRecord(row[0], row[1], Role(row[2]), row[3], float(row[4])) if row else None

    def list_tokens(self) -> list[TokenRecord]:
        with self.db.transaction() as cur:
            rows = cur.execute(sa.select(*_TOKEN_COLUMNS).order_by(tokens.c.created_at)).all()
        return [TokenRecord(r[0], r[1], Role(r[2]), r[3], float(r[4])) for r in rows]

    def delete_token(self, token_id: str) -> bool:
        with self.db.transaction() as cur:
            return cur.execute(tokens.delete().where(tokens.c.id == token_id)).rowcount > 0

    def set_quota(self, project: str, quota: Quota) -> None:
        with self.db.transaction() as cur:
            insert = upsert(cur, quotas).values(
                project=project,
                domains=quota.domains,
                vcpus=quota.vcpus,
                memory_mib=quota.memory_mib,
                snapshot_bytes=quota.snapshot_bytes,
                images=quota.images,
                image_gib=quota.image_gib,
            )
            cur.execute(
                insert.on_conflict_do_update(
                    index_elements=[quotas.c.project],
                    set_={
                        "domains": insert.excluded.domains,
                        "vcpus": insert.excluded.vcpus,
                        "memory_mib": insert.excluded.memory_mib,
                        "snapshot_bytes": insert.excluded.snapshot_bytes,
                        "images": insert.excluded.images,
                        "image_gib": insert.excluded.image_gib,
                    },
                )
            )

    def secret(self, name: str) -> str:
        """A random 256-bit key by `name`: made on first use, the same for every replica and
        across restarts."""
        with self.db.transaction() as cur:
            cur.execute(
                upsert(cur, secrets_table)
                .values(name=name, value=secrets.token_hex(32))
                .on_conflict_do_nothing(index_elements=[secrets_table.c.name])
            )
            value = cur.execute(
                sa.select(secrets_table.c.value).where(secrets_table.c.name == name)
            ).scalar_one()
        return str(value)

    def get_quota(self, project: str) -> Quota | None:
        """The quota an admin set through the API, if any (it overrides the config file)."""
        with self.db.transaction() as cur:
            row = cur.execute(
                sa.select(
                    quotas.c.domains,
                    quotas.c.vcpus,
                    quotas.c.memory_mib,
                    quotas.c.snapshot_bytes,
                    quotas.c.images,
                    quotas.c.image_gib,
                ).where(quotas.c.project == project)
            ).first()
        if not row:
            return None
        return Quota(
            domains=row[0],
            vcpus=row[1],
            memory_mib=row[2],
            snapshot_bytes=row[3],
            images=row[4],
            image_gib=row[5],
        )
