"""User-facing errors: each carries a one-line message that the CLI prints verbatim (exit code 2)."""


class PolyrotError(Exception):
    """Base class for bad input that a user can fix; never a bug in polyrot."""


class UnknownSiteError(PolyrotError, ValueError):
    pass


class ParameterError(PolyrotError, ValueError):
    """A stage parameter has a bad value (non-positive steps, unknown profile, ...)."""


class LineageError(PolyrotError):
    """An upstream run or artifact fetched by run ID failed validation."""


class RunNotFoundError(LineageError):
    pass


class RunNotFinishedError(LineageError):
    pass


class WrongStageError(LineageError):
    pass


class ArtifactMissingError(LineageError):
    pass


class ArtifactCorruptError(LineageError):
    pass


class HubResolutionError(PolyrotError, LookupError):
    """A Hugging Face model, revision or corpus that cannot be resolved here (offline, or absent)."""


class TrackingServerError(PolyrotError):
    """A team tracking server that cannot be reached, refuses the credentials, or cannot be run."""


class SlurmError(PolyrotError):
    """Slurm cannot be reached, or refuses what an experiment asks of it (an unknown partition, ...)."""
