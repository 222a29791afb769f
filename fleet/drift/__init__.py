"""Drift detection from mergeable sketches: pure statistics, tiles, scopes, alerts.

`fleet.drift.api` is the public, typed entry point (pure: numpy + protocol only). The
database and HTTP shells (`models`, `tiles`, `scope`, `service`, `routes`) import SQLModel
and FastAPI; import them only where the fleet service runs.
"""
