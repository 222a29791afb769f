"""Staged rollouts: a persisted state machine that deploys a bundle stage by stage.

- `spec`: what an operator asks for (target, stages, gates, timing), validated.
- `selection`: which devices each stage takes (seeded, optionally spread across tags).
- `gate`: pure gate evaluation of a canary cohort against a control cohort.
- `machine`: the pure core: state + events + now -> new state + actions.
- `table`, `store`, `outbox`, `cohort`, `runner`: the shell (SQL, MQTT, the loop).
- `service`, `api`: create / approve / abort / roll back, as functions and REST routes.

Nothing here is imported at package import time: modules import what they need.
"""
