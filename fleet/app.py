"""The app factory: `create_app(settings)` builds a FastAPI app; nothing exists at import.

The lifespan creates the tables and the bundle store, and (unless a publisher was injected,
as unit tests do) starts the ingest worker and the MQTT client; on shutdown it stops MQTT
first, then lets the worker write out what it already queued.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine

from fleet.api import api_router, ops_router
from fleet.db import create_db, make_engine
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
        worker = mqtt = None
        if publisher is None:
            worker = IngestWorker(
                db, stats, queue_max=settings.ingest_queue_max, batch_max=settings.ingest_batch_max
            )
            worker.start()
            mqtt = FleetMqtt(settings, worker.submit)
            mqtt.start()
            app.state.publisher = mqtt
        app.state.worker, app.state.mqtt = worker, mqtt
        log.info(
            "fleet ready: db %s, bundles in %s, public URL %s",
            db.url.render_as_string(hide_password=True),
            settings.bundle_dir,
            settings.public_url,
        )
        try:
            yield
        finally:
            if mqtt is not None:
                mqtt.stop()
            if worker is not None:
                worker.stop()
            if own_engine:
                db.dispose()
            log.info("fleet stopped")

    app = FastAPI(title="EdgeFleet fleet", version="0.1.0", lifespan=lifespan)
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
    app.include_router(api_router)
    app.include_router(ops_router)
    return app
