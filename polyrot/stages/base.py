"""What a stage is: a name, a tuple of Options, a code version, and the module whose `run(params)
-> run_id` does the work.

The CLI turns each Option into `--option-name`; `polyrot mlproject` turns the same tuple into the
MLproject entry point whose command calls that CLI, so the two can never drift apart (a test
checks the file). The specifications themselves live in polyrot.stages.specs; this module and
that one stay free of torch and mlflow, and a stage's module is imported only when it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from polyrot.errors import ParameterError
from polyrot.toy.task import PARAM_SUFFIX, SPLITS, BatchSpec

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
    run_ids: bool = False     # names upstream runs (comma-separated IDs): the run's inputs

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


def parse_numbers(raw: str, flag: str) -> list[float]:
    """Comma-separated numbers of a list-valued option (--alphas, --lambdas), each once, in order."""
    try:
        values = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ParameterError(f"{flag} takes comma-separated numbers, got {raw!r}") from None
    if not values:
        raise ParameterError(f"{flag} names no value")
    return list(dict.fromkeys(values))


EXPERIMENT = Option("experiment", str, None, "MLflow experiment to log the run in [default: that of the first input "
                    "run, else polyrot]")
PARENT_RUN = Option("parent_run", str, None, "run ID of a parent run (groups runs in the UI)")


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    options: tuple[Option, ...]
    # Bump when the stage's results would change: run reuse keys on it, not on the git commit.
    code_version: str = "1"
    common: tuple[Option, ...] = field(default=(EXPERIMENT, PARENT_RUN))
    # The module holding `run(params) -> run_id`; default polyrot.stages.<name>.
    module: str = ""
    # "module:function" giving the default MLflow experiment of a run on given parameters; by
    # default the first input run's (see experiment_for).
    experiment_default: str = ""

    def run(self, params: dict) -> str:
        """Run the stage on validated parameters (see parse); its module loads here, not before.
        On inputs it has nothing to compute on, it logs a skipped run instead (polyrot.stages.skip)."""
        from polyrot.stages import skip

        params = {**params, "experiment": self.experiment_for(params)}
        why = skip.reason(self.input_runs(params), params.get("checkpoint"))
        if why:
            return skip.log_skipped(self.name, self.code_version, params, why)
        return self.load().run(params)

    def load(self):
        return importlib.import_module(self.module or f"polyrot.stages.{self.name}")

    def input_runs(self, params: dict) -> list[str]:
        """The upstream run IDs in `params`, in option order."""
        return [rid.strip() for o in self.all_options if o.run_ids and params.get(o.name)
                for rid in str(params[o.name]).split(",") if rid.strip()]

    def experiment_for(self, params: dict) -> str:
        """The MLflow experiment a run on `params` belongs to: --experiment when given, else the
        one `experiment_default` names (a reproduction's: its definition's), else its first input
        run's, so that a stage run by hand joins its inputs (and the rotations it registers are
        named for that experiment), else polyrot's default."""
        if params.get("experiment"):
            return params["experiment"]
        if self.experiment_default:
            module, function = self.experiment_default.split(":")
            return getattr(importlib.import_module(module), function)(params)
        from polyrot import tracking

        return tracking.experiment_of(self.input_runs(params)) or tracking.DEFAULT_EXPERIMENT

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


# What each BatchSpec field is, as an option: (type, help, check).
_BATCH_FIELDS = {
    "name": (str, "name of the batch spec (a label)", None),
    "seed": (int, "seed that regenerates the batch bit-identically", None),
    "n_sequences": (int, "number of sequences", positive),
    "min_len": (int, "shortest content length", positive),
    "max_len": (int, "longest content length", positive),
    "split": (str, "split to draw from", None),
}


def batch_options(default: BatchSpec, prefix: str = "batch") -> tuple[Option, ...]:
    """Options describing a BatchSpec (`--batch-seed`, `--batch-sequences`, ...), defaulting to
    `default`; their names are the spec's own parameter names (BatchSpec.as_params)."""
    return tuple(Option(f"{prefix}_{PARAM_SUFFIX[name]}", kind, getattr(default, name), help, check=check,
                        choices=SPLITS if name == "split" else None)
                 for name, (kind, help, check) in _BATCH_FIELDS.items())


def batch_spec(params: dict, prefix: str = "batch") -> BatchSpec:
    """The BatchSpec that `batch_options(prefix=prefix)` parameters describe."""
    try:
        return BatchSpec.from_params(params, prefix)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
