"""The FastAPI application: `create_app(config)`.

    app = create_app(ApiConfig(database_url="sqlite:////tmp/reg.db", tokens=[...]))
    uvicorn.run(app)

The app opens the registry and (unless a `bus` is given) connects to the broker when it
starts (lifespan), and consumes events unless `config.consume_events` is false. Tests pass a
fake `bus` and a `registry` of their own.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from services.api import finishing, reaping
from services.api.config import ApiConfig
from services.api.context import ApiContext, CommandBus
from services.api.limits import BodyLimit
from services.api.models import Health
from services.api.orphans import OrphanSweeper
from services.api.problems import Problem
from services.api.problems import install as install_problems
from services.api.projection import Projection
from services.api.reaping import Reaper
from services.api.registry import Registry
from services.api.request_id import RequestIdMiddleware
from services.api.routes import (
    admin,
    console,
    disks,
    domains,
    events,
    hosts,
    images,
    migration,
    networks,
    snapshots,
    volume_transfer,
    volumes,
)
from services.bus import Bus, BusError
from services.db import DatabaseUnavailable
from services.version import package_version

log = structlog.get_logger("flotilla.api")


def create_app(  # noqa: PLR0915  (the app and its lifespan read best in one place)
    config: ApiConfig,
    *,
    registry: Registry | None = None,
    bus: CommandBus | None = None,
) -> FastAPI:
    """The API app. Without `registry`, it opens `config.database_url`; without `bus`, it
    connects to `config.amqp_url` at start-up (a broker that is down then is retried in the
    background; RPCs answer 503 until it is back)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: ApiContext = app.state.ctx
        own_registry = registry is None
        if own_registry:
            ctx.registry = await run_in_threadpool(Registry.open, config.database_url)
            ctx.auth.registry = ctx.registry
        connector: _BrokerConnector | None = None
        reaper = Reaper(ctx)
        if bus is None:
            connector = _BrokerConnector(config, ctx, reaper)
            await run_in_threadpool(connector.first_attempt)
            connector.start()
        sweeper = _sweeper(config, ctx, reaper).start()
        try:
            yield
        finally:
            await run_in_threadpool(sweeper.stop)
            if connector is not None:
                await run_in_threadpool(connector.stop)
            await run_in_threadpool(reaper.stop)
            if own_registry:
                ctx.registry.close()

    app = FastAPI(
        title="Flotilla API",
        version=package_version(),
        summary="Domains, hosts and events of a Flotilla private cloud.",
        lifespan=lifespan,
    )
    # Until the lifespan opens the configured registry, a placeholder keeps types simple.
    app.state.ctx = ApiContext(config=config, registry=registry or _Unopened(), bus=bus)
    install_problems(app)
    app.add_exception_handler(DatabaseUnavailable, _database_unavailable)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    for module in (
        domains,
        console,
        hosts,
        events,
        admin,
        snapshots,
        images,
        volume_transfer,
        migration,
    ):
        app.include_router(module.router)
    app.include_router(networks.networks_router)
    app.include_router(networks.ports_router)
    app.include_router(volumes.pools_router)
    app.include_router(volumes.router)
    app.include_router(disks.router)
    _install_metrics(app)
    app.add_middleware(RequestIdMiddleware)  # outermost: its id is in every answer

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> JSONResponse:
        """200 when the registry answers and the broker is connected, else 503."""
        ctx: ApiContext = app.state.ctx
        details: dict[str, str] = {}
        try:
            ctx.registry.events.last_id()
            database = True
        except Exception as exc:
            database, details["database"] = False, str(exc)
        broker = ctx.broker_connected() if ctx.broker_connected is not None else ctx.bus is not None
        ok = database and broker
        body = Health(
            status="ok" if ok else "degraded", database=database, broker=broker, details=details
        )
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus text format."""
        ctx: ApiContext = app.state.ctx
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _database_unavailable(_request: Request, exc: Exception) -> Response:
    # The driver's message names servers and ports: it goes to the log, not to tenants.
    log.warning("registry unavailable", error=str(exc))
    return Problem(
        503,
        "database_unavailable",
        "the registry's database is unavailable; retry later",
        headers={"Retry-After": "5"},
    ).response()


def _sweeper(config: ApiConfig, ctx: ApiContext, reaper: Reaper) -> OrphanSweeper:
    """The orphan sweep, settling dead replicas' creates and unfinished deletes."""
    return OrphanSweeper(
        ctx.registry,
        config.schedule_timeout_s,
        reap=reaper.submit,
        release=functools.partial(reaping.release, ctx),
        finish=functools.partial(finishing.finish_start, ctx),
    )


class _BrokerConnector:
    """Connects the app to the broker, retrying in the background while it is unreachable;
    once connected, RPCs go through it and (unless disabled) events are consumed."""

    def __init__(self, config: ApiConfig, ctx: ApiContext, reaper: Reaper) -> None:
        self.config = config
        self.ctx = ctx
        self.reaper = reaper
        self.bus: Bus | None = None
        self.projection: Projection | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-broker", daemon=True)

    def first_attempt(self) -> None:
        self._connect(self.config.broker_connect_timeout_s)

    def start(self) -> None:
        if self.bus is None:
            self._thread.start()

    def _run(self) -> None:
        while self.bus is None and not self._stopping.wait(2.0):
            self._connect(self.config.broker_connect_timeout_s)

    def _connect(self, timeout: float) -> None:
        bus = Bus(self.config.amqp_url, source="api")
        try:
            bus.start(timeout)
        except BusError as exc:
            log.warning("broker unreachable; retrying", error=str(exc))
            return
        if self.config.consume_events:
            self.projection = Projection(
                bus, self.ctx.registry, self.ctx.metrics, self.ctx.wakeup.notify, self.reaper.submit
            ).start()
        self.bus = bus
        self.ctx.bus = bus
        self.ctx.broker_connected = lambda: bus.link.connected

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(15)
        if self.projection is not None:
            self.projection.stop()
        if self.bus is not None:
            self.bus.close()


class _Unopened(Registry):
    def __init__(self) -> None:  # no database until the app starts
        pass


def _install_metrics(app: FastAPI) -> None:
    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path_format", None) or "unmatched"
            ctx: ApiContext = request.app.state.ctx
            ctx.metrics.requests.labels(request.method, template, str(status)).inc()
            ctx.metrics.latency.labels(request.method, template).observe(
                time.perf_counter() - started
            )
