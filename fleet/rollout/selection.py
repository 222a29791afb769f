"""Which devices each stage takes: random but reproducible (seeded), optionally stratified.

The whole assignment is computed once, when the rollout is created, and stored per device,
so a restart (or another fleet process) never re-draws it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from fleet.rollout.spec import StageSpec

__all__ = ["Candidate", "assign_stages", "stage_sizes"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    device_id: str
    tags: tuple[str, ...] = ()


def _ordered(candidates: Sequence[Candidate], seed: int, spread_by_tag: bool) -> list[str]:
    rng = random.Random(seed)
    ids = sorted(c.device_id for c in candidates)  # input order must not matter
    if not spread_by_tag:
        rng.shuffle(ids)
        return ids
    by_key: dict[tuple[str, ...], list[str]] = {}
    tags = {c.device_id: tuple(sorted(c.tags)) for c in candidates}
    for device_id in ids:
        by_key.setdefault(tags[device_id], []).append(device_id)
    keyed: list[tuple[float, float, str]] = []
    for key in sorted(by_key):
        group = by_key[key]
        rng.shuffle(group)
        # Spread each group evenly over [0, 1): every prefix of the merged order then holds
        # each tag combination in proportion to its size (within one device).
        for i, device_id in enumerate(group):
            keyed.append(((i + 0.5) / len(group), rng.random(), device_id))
    keyed.sort()
    return [device_id for _, _, device_id in keyed]


def stage_sizes(total: int, stages: Sequence[StageSpec]) -> list[int]:
    """Cumulative device counts per percent stage (``-1`` for stages without a percent)."""
    out = []
    for stage in stages:
        if stage.percent is None:
            out.append(-1)
        else:
            out.append(min(total, max(1, math.ceil(stage.percent * total / 100.0 - 1e-9))))
    return out


def assign_stages(
    candidates: Sequence[Candidate],
    stages: Sequence[StageSpec],
    *,
    seed: int,
    spread_by_tag: bool = False,
) -> list[tuple[str, int]]:
    """``(device_id, stage)`` for every candidate, in deployment order.

    A stage takes its explicit devices and tagged devices first, then tops the cumulative
    count up to its percentage from the seeded order. The last stage (100 %) takes the rest.
    """
    by_id = {c.device_id: c for c in candidates}
    order = _ordered(candidates, seed, spread_by_tag)
    taken: dict[str, int] = {}
    result: list[tuple[str, int]] = []
    sizes = stage_sizes(len(order), stages)
    for index, stage in enumerate(stages):
        explicit = [d for d in stage.devices if d in by_id and d not in taken]
        wanted_tags = set(stage.tags)
        if wanted_tags:
            explicit += [
                d
                for d in order
                if d not in taken and d not in explicit and wanted_tags & set(by_id[d].tags)
            ]
        for device_id in explicit:
            taken[device_id] = index
            result.append((device_id, index))
        if sizes[index] >= 0:
            for device_id in order:
                if len(taken) >= sizes[index]:
                    break
                if device_id not in taken:
                    taken[device_id] = index
                    result.append((device_id, index))
    return result
