"""One definition of each stage's parameters, read by the click CLI and by the MLproject writer.

A stage is a name, a tuple of Options and a `run(params) -> run_id` function. The CLI turns each
Option into `--option-name`; `polyrot mlproject` turns the same tuple into the MLproject entry
point whose command calls that CLI, so the two can never drift apart (a test checks the file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from polyrot.dyck import SPLITS, BatchSpec
from polyrot.errors import ParameterError

REQUIRED = object()


@dataclass(frozen=True)
class Option:
    name: str
    type: type = str
    default: object = None   # None: optional / "use the profile's value"; REQUIRED: must be given
    help: str = ""
    choices: tuple[str, ...] | None = None
    check: Callable[[object], str | None] | None = None  # returns an error message or None
    positional: bool = False  # a CLI argument (`polyrot reproduce NAME`) rather than an option

    @property
    def flag(self) -> str:
        return self.name.upper() if self.positional else "--" + self.name.replace("_", "-")

    def parse(self, raw):
        """Convert a CLI/MLproject value; "" means "not given" so MLproject can pass optionals."""
        if raw is None or raw == "":
            if self.default is REQUIRED:
                raise ParameterError(f"{self.flag} is required")
            return self.default
        try:
            if self.type is bool:
                value = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif self.type is int:
                number = float(raw)  # MLflow may hand over "1e4" or "500.0"
                if not number.is_integer():
                    raise ValueError
                value = int(number)
            else:
                value = self.type(raw)
        except (TypeError, ValueError):
            raise ParameterError(f"{self.flag} expects {self.type.__name__}, got {raw!r}") from None
        if self.choices and value not in self.choices:
            raise ParameterError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.check:
            problem = self.check(value)
            if problem:
                raise ParameterError(f"{self.flag} {problem}, got {value!r}")
        return value


def positive(v) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be non-negative"


def unit_interval(v) -> str | None:
    return None if 0 < v <= 1 else "must lie in (0, 1]"


def parse_numbers(raw: str, flag: str) -> list[float]:
    """Comma-separated numbers of a list-valued option (--alphas, --lambdas), each once, in order."""
    try:
        values = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ParameterError(f"{flag} takes comma-separated numbers, got {raw!r}") from None
    if not values:
        raise ParameterError(f"{flag} names no value")
    return list(dict.fromkeys(values))


EXPERIMENT = Option("experiment", str, "polyrot", "MLflow experiment to log the run in")
PARENT_RUN = Option("parent_run", str, None, "run ID of a parent run (groups runs in the UI)")


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    options: tuple[Option, ...]
    run: Callable[[dict], str]
    # Bump when the stage's results would change: run reuse keys on it, not on the git commit.
    code_version: str = "1"
    common: tuple[Option, ...] = field(default=(EXPERIMENT, PARENT_RUN))

    @property
    def cli_name(self) -> str:
        return self.name.replace("_", "-")

    @property
    def all_options(self) -> tuple[Option, ...]:
        return self.options + self.common

    def parse(self, raw: dict) -> dict:
        """Validated parameters from raw CLI / MLproject values; unknown names are an error."""
        known = {o.name: o for o in self.all_options}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ParameterError(f"stage {self.name} has no parameter {unknown[0]!r}; it has: {', '.join(known)}")
        return {name: opt.parse(raw.get(name)) for name, opt in known.items()}

    def __call__(self, **raw) -> str:
        """Run the stage from Python: polyrot.stages.STAGES['train_seed'](seed=0)."""
        return self.run(self.parse(raw))


def batch_options(default: BatchSpec, prefix: str = "batch") -> tuple[Option, ...]:
    """Options describing a BatchSpec (`--batch-seed`, `--batch-sequences`, ...), defaulting to `default`."""
    return (
        Option(f"{prefix}_name", str, default.name, "name of the batch spec (a label)"),
        Option(f"{prefix}_seed", int, default.seed, "seed that regenerates the batch bit-identically"),
        Option(f"{prefix}_sequences", int, default.n_sequences, "number of sequences", check=positive),
        Option(f"{prefix}_min_len", int, default.min_len, "shortest content length", check=positive),
        Option(f"{prefix}_max_len", int, default.max_len, "longest content length", check=positive),
        Option(f"{prefix}_split", str, default.split, "split to draw from", choices=SPLITS),
    )


def batch_spec(params: dict, prefix: str = "batch") -> BatchSpec:
    """The BatchSpec that `batch_options(prefix=prefix)` parameters describe."""
    try:
        return BatchSpec(name=params[f"{prefix}_name"], seed=params[f"{prefix}_seed"],
                         n_sequences=params[f"{prefix}_sequences"], min_len=params[f"{prefix}_min_len"],
                         max_len=params[f"{prefix}_max_len"], split=params[f"{prefix}_split"])
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
