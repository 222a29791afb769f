"""The app factory: `create_app(settings)` builds a FastAPI app; nothing exists at import.

The lifespan creates the tables and the bundle store, and (unless a publisher was injected,
as unit tests do) starts the ingest worker and the MQTT client; on shutdown it stops MQTT
first, then lets the worker write out what it already queued.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError

from fleet.api import api_router, ops_router
from fleet.auth import authorize, tokens_router
from fleet.db import WalCheckpointer, create_db, make_engine
from fleet.deployment import CommandPublisher
from fleet.errors import FleetError, SettingsError
from fleet.ingest import IngestStats
from fleet.metrics import FleetCollector, make_registry
from fleet.registry import BundleStore
from fleet.settings import FleetSettings
from protocol.errors import ProtocolError
from protocol.trust import TrustRoot

__all__ = ["create_app"]

log = logging.getLogger(__name__)


async def _fleet_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    if exc.status_code >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(exc.body(), status_code=exc.status_code)


async def _out_of_range(_request: Request, exc: Exception) -> JSONResponse:
    log.info("request refused: a value is out of range for the database (%s)", exc)
    return JSONResponse(
        {"error": "invalid_request", "detail": "a number in the request is out of range"},
        status_code=422,
    )


def create_app(
    settings: FleetSettings,
    *,
    publisher: CommandPublisher | None = None,
    engine: Engine | None = None,
) -> FastAPI:
    """Build the fleet app. ``publisher`` replaces MQTT entirely (no ingest, no client)."""
    try:
        trust = TrustRoot.load(settings.trust_root)
    except ProtocolError as exc:
        raise SettingsError(f"trust_root: {exc}") from exc
    own_engine = engine is None
    db = engine if engine is not None else make_engine(settings.database_url)
    stats = IngestStats()
    store = BundleStore(
        bundle_dir=settings.bundle_dir, trust=trust, max_upload_bytes=settings.max_upload_bytes
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from fleet.mqtt import FleetMqtt
        from fleet.worker import IngestWorker

        create_db(db)
        store.prepare()
        _load_trust_chain(app, db)
        worker = mqtt = checkpointer = None
        if publisher is None:
            checkpointer = WalCheckpointer(db)  # SQLite only
            checkpointer.start()
            worker = IngestWorker(
                db,
                stats,
                queue_max=settings.ingest_queue_max,
                batch_max=settings.ingest_batch_max,
                linger_s=settings.ingest_linger_ms / 1000,
            )
            worker.start()
            mqtt = FleetMqtt(settings, worker.submit)
            mqtt.start()
            app.state.publisher = mqtt
            # Bundle chunks over MQTT for agents (fleet/transfer.py); its own connection.
            from fleet.transfer import ChunkServer

            chunks = ChunkServer(settings, bundle_dir=settings.bundle_dir)
            chunks.start()
            app.state.chunk_server = chunks
        app.state.worker, app.state.mqtt = worker, mqtt
        runner = _start_rollouts(app, db, settings, loop=publisher is None)
        log.info(
            "fleet ready: db %s, bundles in %s, public URL %s",
            db.url.render_as_string(hide_password=True),
            settings.bundle_dir,
            settings.public_url,
        )
        try:
            yield
        finally:
            if getattr(app.state, "chunk_server", None) is not None:
                app.state.chunk_server.stop()
            if runner is not None:
                runner.stop()
            if mqtt is not None:
                mqtt.stop()
            if worker is not None:
                worker.stop()
            if checkpointer is not None:
                checkpointer.stop()
            if own_engine:
                db.dispose()
            log.info("fleet stopped")

    # Every route needs a bearer token with the role its method and path call for
    # (fleet/auth.py), except the few it lists as open (/healthz, /metrics).
    app = FastAPI(
        title="EdgeFleet fleet",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
    )
    if not settings.auth_enabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (auth_enabled=false): anyone who can reach %s can "
            "deploy, enroll and revoke; use this only on a laptop",
            settings.public_url,
        )
    app.state.settings = settings
    app.state.engine = db
    app.state.stats = stats
    app.state.store = store
    app.state.trust = trust
    app.state.publisher = publisher
    app.state.worker = None
    app.state.mqtt = None
    app.state.metrics_registry = make_registry(
        FleetCollector(
            db,
            stats,
            offline_after_s=settings.offline_after_s,
            backlog=lambda: app.state.worker.backlog if app.state.worker is not None else 0,
        )
    )
    app.add_exception_handler(FleetError, _fleet_error)
    # A number the database cannot hold (SQLite: 64-bit; PostgreSQL: the column's type) in a
    # query or body is the client's mistake, not a 500 (found by benchmarks/fuzz.py).
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _out_of_range)
    app.include_router(api_router)
    app.include_router(ops_router)
    _include_rollouts(app, db, settings)
    _include_security_routers(app)
    from fleet.drift.routes import drift_router  # its lifespan runs the drift loop

    app.include_router(drift_router)
    from fleet.quality.routes import quality_router  # its lifespan runs the quality loop

    app.include_router(quality_router)
    from fleet.dashboard import mount_dashboard  # the web UI under /ui (fleet/dashboard)

    mount_dashboard(app)
    return app


def _include_security_routers(app: FastAPI) -> None:
    from fleet.audit import audit_router
    from fleet.enroll import enroll_router
    from fleet.trust_store import trust_router

    for router in (tokens_router, enroll_router, trust_router, audit_router):
        app.include_router(router)


def _load_trust_chain(app: FastAPI, db: Engine) -> None:
    """Use the newest trust root the fleet accepted (POST /api/v1/trust-root) over the file's."""
    import dataclasses

    from sqlmodel import Session

    from fleet.trust_store import load_current_root

    with Session(db) as session:
        try:
            trust = load_current_root(session, app.state.trust)
        except ProtocolError as exc:
            raise SettingsError(f"stored trust-root chain does not verify: {exc}") from exc
    if trust is not app.state.trust:
        log.info("using trust root version %d from the database", trust.version)
        app.state.trust = trust
        app.state.store = dataclasses.replace(app.state.store, trust=trust)


def _include_rollouts(app: FastAPI, db: Engine, settings: FleetSettings) -> None:
    """Staged rollouts: their routes, and their figures on /metrics."""
    from fleet.rollout.api import rollout_router
    from fleet.rollout.metric import RolloutCollector

    app.include_router(rollout_router)
    app.state.metrics_registry.register(RolloutCollector(db, settings))
    app.state.rollout_runner = None


def _start_rollouts(app: FastAPI, db: Engine, settings: FleetSettings, *, loop: bool) -> Any:
    """The rollout runner; its loop runs only with a real broker (tests tick it by hand)."""
    from fleet.rollout.runner import RolloutRunner

    runner = RolloutRunner(db, settings, app.state.publisher)
    app.state.rollout_runner = runner
    if loop and settings.rollout_loop:
        runner.start()
        return runner
    return None
