"""What plain MLflow learns from polyrot through the plugin entry points in pyproject.toml.

- A default experiment. A run that MLflow would file under "Default" in polyrot's store (`mlflow
  run . -e train_seed` with nothing exported, `mlflow.start_run()` in a notebook after
  `polyrot.tracking.configure()`) goes where polyrot's CLI would put it instead: the
  `experiment` parameter when given, else the experiment of the entry point's input runs, else
  polyrot's default experiment.
- A guard on MLflow's implicit store. Started in a folder of the checkout other than its root (a
  notebook in docs/), MLflow's default `./mlflow.db` would be a new, empty store created without
  a word; opening it is refused with polyrot's one-line hint instead.

MLflow loads the experiment provider while `import mlflow` runs, so this module imports nothing
of MLflow or polyrot's tracking layer at its top: both load when MLflow first asks.
"""

from __future__ import annotations

import sys
from pathlib import Path


class DefaultExperiment:
    """MLflow's default-experiment provider interface (`in_context`, `get_experiment_id`)."""

    def in_context(self) -> bool:
        from mlflow.tracking import get_tracking_uri

        from polyrot import tracking

        return tracking.absolute_uri(get_tracking_uri()) == tracking.tracking_uri()

    def get_experiment_id(self) -> str:
        from polyrot import tracking

        return tracking.experiment_id(_mlflow_run_experiment() or tracking.DEFAULT_EXPERIMENT)


def _mlflow_run_experiment() -> str | None:
    """Under `mlflow run <polyrot checkout> -e STAGE -P ...`, the experiment polyrot's CLI would
    give that stage on those parameters; None in any other process."""
    if sys.argv[1:2] != ["run"] or "mlflow.cli" not in sys.modules:
        return None
    import click
    from mlflow.cli import _user_args_to_dict
    from mlflow.cli import run as run_command

    from polyrot import tracking
    from polyrot.stages import STAGES

    try:  # MLflow's own parser, so -P, --param-list and -Pk=v read as MLflow reads them
        ctx = run_command.make_context("run", sys.argv[2:], resilient_parsing=True)
        params = _user_args_to_dict(ctx.params.get("param_list") or ())
    except click.ClickException:
        return None
    if Path(ctx.params.get("uri") or ".").resolve() != tracking.REPO_ROOT:
        return None
    entry = ctx.params.get("entry_point") or "main"
    stage = STAGES.get("reproduce" if entry == "main" else entry)
    if stage is None:
        return None
    try:
        return stage.experiment_for(stage.parse(params))
    except ValueError:  # bad parameters: the entry point refuses them in its own words
        return None


def tracking_store(store_uri: str, artifact_uri: str | None = None):
    """MLflow's SQLite tracking store, after the guard."""
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store

    _guard(store_uri)
    return _get_sqlalchemy_store(store_uri, artifact_uri)


def registry_store(store_uri: str):
    """MLflow's SQLite model-registry store, after the guard."""
    from mlflow.tracking._model_registry.utils import _get_sqlalchemy_store

    _guard(store_uri)
    return _get_sqlalchemy_store(store_uri)


def _guard(store_uri: str) -> None:
    """Refuse MLflow's implicit ./mlflow.db when it does not exist yet and the working directory
    is inside polyrot's checkout but not its root: there, it is polyrot's store missed."""
    from mlflow.exceptions import MlflowException

    from polyrot import tracking

    path = tracking.sqlite_path(store_uri)
    if path is None or path.exists():
        return
    here, root = Path.cwd().resolve(), tracking.store_root()
    if path.resolve() == here / tracking.MLFLOW_DEFAULT_DB and here != root and here.is_relative_to(root):
        raise MlflowException(tracking.wrong_store_hint(store_uri))
