"""What each stage's batch job asks for, from an experiment file's `resources` section.

    resources:
      cpu:                                   # a profile
        default: {cpus: 1, mem: 2G}          # every stage not named below
        train_sae: {mem: 3G}                 # fields not given come from `default`
      paper:
        default: {cpus: 1, mem: 4G}
        train_seed: {cpus: 4, mem: 16G, gpus: 1, time: "04:00:00"}

Only the Slurm executor reads it; the local executor runs stages on this machine's cores. A stage's
`threads` follows its `cpus`, so a job uses what it asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from polyrot.errors import PolyrotError

DEFAULT = "default"
_MEM = re.compile(r"^\d+[KMGT]?$")
_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # Slurm's [days-]hours:minutes:seconds and its shorter forms


@dataclass(frozen=True)
class Resources:
    cpus: int = 1
    mem: str = "2G"   # Slurm's --mem: megabytes, or with a K/M/G/T suffix
    gpus: int = 0
    time: str | None = None  # a job's time limit; the partition's default when unset


def _field(name: str, value, at: str):
    if name in ("cpus", "gpus"):
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "cpus" else 0):
            raise PolyrotError(f"{at}: resources {name} must be an integer {'>= 1' if name == 'cpus' else '>= 0'}, "
                               f"got {value!r}")
        return value
    text = str(value)
    if not (_MEM if name == "mem" else _TIME).match(text):
        example = "2G, 500M or 4096" if name == "mem" else "30, 01:30:00 or 1-00:00:00"
        raise PolyrotError(f"{at}: resources {name} must look like {example}, got {value!r}")
    return text


def parse_resources(section, profile: str, stages: set[str], where: str) -> dict[str, Resources]:
    """{stage or "default": Resources} of one profile; every error names the file and line."""
    if section is None:
        return {DEFAULT: Resources()}
    if not isinstance(section, dict):
        raise PolyrotError(f"{where}: 'resources' maps profiles to stages to {{cpus, mem, gpus, time}}")
    table = section.get(profile) or {}
    known = {f.name for f in fields(Resources)}
    parsed: dict[str, dict] = {}
    for stage, entry in table.items():
        if stage == "__line__":
            continue
        line = entry.get("__line__") if isinstance(entry, dict) else None
        at = f"{where}:{line or table.get('__line__', 0)}"
        if stage != DEFAULT and stage not in stages:
            raise PolyrotError(f"{at}: resources for unknown stage {stage!r}; stages: {DEFAULT}, {', '.join(sorted(stages))}")
        if not isinstance(entry, dict):
            raise PolyrotError(f"{at}: resources of {stage} are a mapping of {', '.join(sorted(known))}")
        unknown = sorted(set(entry) - known - {"__line__"})
        if unknown:
            raise PolyrotError(f"{at}: resources have no field {unknown[0]!r}; they have: {', '.join(sorted(known))}")
        parsed[stage] = {k: _field(k, v, at) for k, v in entry.items() if k != "__line__"}
    base = replace(Resources(), **parsed.pop(DEFAULT, {}))
    return {DEFAULT: base, **{stage: replace(base, **entry) for stage, entry in parsed.items()}}


def for_stage(table: dict[str, Resources], stage: str) -> Resources:
    return table.get(stage, table[DEFAULT])
