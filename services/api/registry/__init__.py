"""The registry: the control plane's database of domains, their event log, hosts and tokens.

It holds the desired spec of every domain (and its project) plus a projection of the compute
nodes' events: power state, task, host, last `seq`, fault. The compute nodes own the truth about
what runs; the registry is what the API answers from.

`Registry` opens the database and brings its schema up to date; its parts, one concern each,
share that database:
- `domains` (services.api.registry.domains): the domain records, quota usage, the changes
  requests make;
- `events` (services.api.registry.events): the event log; appending a domain event projects
  it onto its record by the rules of services.api.registry.projection;
- `settling` (services.api.registry.settling): creates and deletes no request finished;
- `hosts` (services.api.registry.hosts): heartbeats and the enabled switch;
- `access` (services.api.registry.access): tokens, quotas, shared secrets;
- `states` (services.api.saved_states): saves, managed saves and snapshot trees.
"""

from __future__ import annotations

from services.api.registry.access import Access
from services.api.registry.domains import Domains
from services.api.registry.events import EventLog
from services.api.registry.hosts import Hosts
from services.api.registry.settling import Settling
from services.api.saved_states import SavedStates
from services.api.tables import REGISTRY
from services.db import Database, upgrade


class Registry:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.domains = Domains(db)
        self.events = EventLog(db)
        self.settling = Settling(db, self.domains)
        self.hosts = Hosts(db)
        self.access = Access(db)
        self.states = SavedStates(db)

    @classmethod
    def open(cls, url: str) -> Registry:
        registry = cls(Database(url))
        registry.migrate()
        return registry

    def close(self) -> None:
        self.db.close()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent; safe from several replicas;
        a database made before migrations existed is adopted, see services.db)."""
        upgrade(self.db, REGISTRY)
