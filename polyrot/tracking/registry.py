"""The rotation registry: every fitted rotation is an MLflow model version that code can pull back.

Naming scheme (what `fit_rotation` registers):

    registered model   polyrot.<experiment>.<site>       one per experiment and site
    version            one per fit                       source run -> target run
    alias              s<source seed>-to-s<target seed>  moves to the newest fit of that pair

so `models:/polyrot.polyrot.resid_mid_1@s0-to-s3` names seed 0 <- seed 3 at resid_mid_1, and
resolves through plain MLflow as well as through `load_rotation`. Each version is an MLflow 3
LoggedModel holding `rotation.safetensors` (polyrot.core.rotation.Rotation: R, both means, provenance
in the header) and `rotation.json` (the same provenance and the statistics, readable); no pickle,
no pyfunc. A plain run artifact cannot be registered, hence the LoggedModel. Version tags carry
the site, run IDs, seeds and the file's sha256, which `find_rotation` / `list_rotations` search
and `load_rotation` checks.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from polyrot import tracking
from polyrot.core.rotation import Rotation
from polyrot.errors import (
    ArtifactCorruptError,
    ArtifactMissingError,
    ParameterError,
    PolyrotError,
)

WEIGHTS_FILE = "rotation.safetensors"
METADATA_FILE = "rotation.json"
MODEL_TYPE = "polyrot-rotation"

TAG_KIND = "polyrot.kind"
KIND = "rotation"
TAG_SITE = "polyrot.site"
TAG_EXPERIMENT = "polyrot.experiment"
TAG_SOURCE_RUN = "polyrot.source_run"
TAG_TARGET_RUN = "polyrot.target_run"
TAG_SOURCE_SEED = "polyrot.source_seed"
TAG_TARGET_SEED = "polyrot.target_seed"
TAG_FIT_RUN = "polyrot.fit_run"
TAG_SHA256 = "polyrot.sha256"

# The rotation metadata a registered version is found by; fit_rotation writes all of it.
PROVENANCE = ("site", "source_run", "target_run", "source_seed", "target_seed")
LISTED_METRICS = ("frob_from_identity", "frob_ratio", "ks_statistic", "ks_pvalue", "rotation_ev", "identity_ev")
COLUMNS = ("name", "version", "aliases", "site", "experiment", "source_run", "target_run", "source_seed",
           "target_seed", "fit_run", "model_id", "created", *LISTED_METRICS)

# MLflow's own alias rule; checked up front so a bad alias fails before anything is logged.
_ALIAS = re.compile(r"[\w-]{1,255}")
_RESERVED_ALIAS = re.compile(r"latest|[vV]\d+", re.IGNORECASE)


class RotationNotFoundError(PolyrotError, LookupError):
    """No registered rotation matches: an unknown model name, alias, version or run pair."""


def model_name(experiment: str, site: str) -> str:
    """`polyrot.<experiment>.<site>`, with characters outside [A-Za-z0-9_-] in the experiment
    name replaced by '-': registered-model names may not contain '/' or ':' and end up in URIs."""
    return f"polyrot.{re.sub(r'[^A-Za-z0-9_-]+', '-', experiment)}.{site}"


def pair_alias(source_seed, target_seed) -> str:
    return f"s{source_seed}-to-s{target_seed}"


def check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias) or _RESERVED_ALIAS.fullmatch(alias):
        raise ParameterError(f"alias {alias!r} is not usable: letters, digits, '_' and '-' only, "
                             "and not 'latest' or v<number> (reserved by MLflow)")
    return alias


def register_rotation(rotation: Rotation, run: tracking.StageRun, *, name: str, alias: str,
                      statistics: Mapping[str, float]):
    """Log `rotation` as a LoggedModel of `run`, register it as a new version of `name`, point
    `alias` at that version, and return the ModelVersion.

    `statistics` become metrics `<site>.<key>` of `run` linked to the model, so the run and the
    model show the same numbers. An alias names one version at a time: registering a pair again
    moves its alias to the new version, and the old version stays loadable by number.
    """
    missing = [key for key in PROVENANCE if key not in rotation.metadata]
    if missing:
        raise ValueError(f"rotation metadata lacks {', '.join(missing)}: a registered rotation must name its pair")
    check_alias(alias)
    meta = rotation.metadata
    site = meta["site"]
    client = run.client
    experiment_id = client.get_run(run.run_id).info.experiment_id
    tags = {TAG_KIND: KIND, TAG_SITE: site, TAG_EXPERIMENT: client.get_experiment(experiment_id).name,
            TAG_SOURCE_RUN: meta["source_run"], TAG_TARGET_RUN: meta["target_run"],
            TAG_SOURCE_SEED: str(meta["source_seed"]), TAG_TARGET_SEED: str(meta["target_seed"]),
            TAG_FIT_RUN: run.run_id}
    # The floats in a fit's metadata are measurements (rotation_ev, ...): metrics, not parameters.
    params = {key: str(value) for key, value in meta.items() if not isinstance(value, float)}
    with tempfile.TemporaryDirectory(prefix="polyrot-rotation-") as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        rotation.save(weights)
        (Path(tmp) / METADATA_FILE).write_text(
            json.dumps({"metadata": meta, "statistics": dict(statistics)}, indent=2, sort_keys=True))
        tags[TAG_SHA256] = tracking.sha256_file(weights)
        model = client.create_logged_model(experiment_id, name=f"rotation-{site}", source_run_id=run.run_id,
                                           tags=tags, params=params, model_type=MODEL_TYPE)
        try:
            client.log_model_artifacts(model.model_id, tmp)
            now = int(time.time() * 1000)
            metrics = [Metric(f"{site}.{key}", float(value), now, 0, model_id=model.model_id)
                       for key, value in statistics.items()]
            client.log_batch(run.run_id, metrics=metrics, synchronous=True)
        except BaseException:
            client.finalize_logged_model(model.model_id, "FAILED")
            raise
        client.finalize_logged_model(model.model_id, "READY")
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    client.set_registered_model_tag(name, TAG_KIND, KIND)
    client.update_registered_model(name, description=(
        f"polyrot rotations at {site}: one version per fitted (source run, target run) pair, mapping "
        "target activations into the source frame; aliases sN-to-sM for source seed N and target seed M."))
    client.set_registered_model_alias(name, alias, version.version)
    return version


def _rotation_models(client: MlflowClient) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(f"tags.`{TAG_KIND}` = '{KIND}'"))


def _search_versions(client: MlflowClient, tags: Mapping[str, str]) -> list:
    conditions = " and ".join(f"tags.`{key}` = '{value}'" for key, value in {TAG_KIND: KIND, **tags}.items())
    found, token = [], None
    while True:
        page = client.search_model_versions(conditions, page_token=token)
        found += page
        token = page.token
        if not token:
            return found


def _model_version(client: MlflowClient, name: str, alias: str | None, version: int | str | None):
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(_rotation_models(client)) or "none"
        raise RotationNotFoundError(f"no registered model {name!r}; registered rotations: {known}") from None
    if alias is not None:
        if alias not in registered.aliases:
            known = ", ".join(sorted(registered.aliases)) or "none"
            raise RotationNotFoundError(f"model {name!r} has no alias {alias!r}; its aliases: {known}")
        version = registered.aliases[alias]
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if version is None:
        if not versions:
            raise RotationNotFoundError(f"model {name!r} has no versions")
        version = versions[-1]
    if str(version) not in map(str, versions):
        raise RotationNotFoundError(f"model {name!r} has no version {version}; its versions: "
                                    f"{', '.join(map(str, versions)) or 'none'}")
    found = client.get_model_version(name, str(version))
    if found.tags.get(TAG_KIND) != KIND:
        raise RotationNotFoundError(f"model {name!r} version {version} is not a polyrot rotation")
    return found


def load_rotation(name: str, alias: str | None = None, version: int | str | None = None) -> Rotation:
    """The Rotation registered as `name` at `alias` or `version` (default: the newest version).

    The file is fetched through MLflow (`models:/<name>/<version>`) and checked against the sha256
    recorded at registration, so a tampered or truncated store is refused rather than half-read.
    """
    if alias is not None and version is not None:
        raise ParameterError(f"give an alias or a version of {name!r}, not both")
    client = tracking.configure()
    found = _model_version(client, name, alias, version)
    with tempfile.TemporaryDirectory(prefix="polyrot-rotation-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{found.version}", dst_path=tmp))
        except (MlflowException, OSError):
            raise ArtifactMissingError(f"model {name!r} version {found.version}: its files are not in the "
                                       "artifact store") from None
        weights = local / WEIGHTS_FILE
        if not weights.is_file():
            raise ArtifactMissingError(f"model {name!r} version {found.version} has no {WEIGHTS_FILE}")
        digest = tracking.sha256_file(weights)
        if digest != found.tags.get(TAG_SHA256):
            raise ArtifactCorruptError(f"model {name!r} version {found.version} is corrupt: sha256 {digest[:12]}… "
                                       f"!= registered {found.tags.get(TAG_SHA256, '?')[:12]}…")
        return Rotation.load(weights)


def find_rotation(*, source_run: str, target_run: str, site: str) -> Rotation:
    """The newest registered rotation of this run pair at this site, in whatever experiment."""
    client = tracking.configure()
    matches = _search_versions(client, {TAG_SOURCE_RUN: source_run, TAG_TARGET_RUN: target_run, TAG_SITE: site})
    if not matches:
        raise RotationNotFoundError(f"no registered rotation at {site} from target run {target_run} "
                                    f"to source run {source_run}")
    newest = max(matches, key=lambda v: (v.creation_timestamp, int(v.version)))
    return load_rotation(newest.name, version=newest.version)


def list_rotations(*, experiment: str | None = None, site: str | None = None, source_run: str | None = None,
                   target_run: str | None = None) -> pd.DataFrame:
    """One row per registered rotation version matching every filter given, sorted by name and version.

    `aliases` is the comma-joined aliases that currently point at the version (empty once moved);
    the statistics columns are the model's metrics; `created` is a UTC timestamp.
    """
    client = tracking.configure()
    filters = {TAG_EXPERIMENT: experiment, TAG_SITE: site, TAG_SOURCE_RUN: source_run, TAG_TARGET_RUN: target_run}
    versions = _search_versions(client, {k: v for k, v in filters.items() if v is not None})
    aliases = {name: client.get_registered_model(name).aliases for name in {v.name for v in versions}}
    rows = []
    for v in versions:
        model_id = v.source.removeprefix("models:/")
        site_of = v.tags[TAG_SITE]
        metrics = {m.key.removeprefix(f"{site_of}."): m.value for m in client.get_logged_model(model_id).metrics}
        rows.append({
            "name": v.name, "version": int(v.version),
            "aliases": ",".join(sorted(a for a, n in aliases[v.name].items() if str(n) == str(v.version))),
            "site": site_of, "experiment": v.tags[TAG_EXPERIMENT],
            "source_run": v.tags[TAG_SOURCE_RUN], "target_run": v.tags[TAG_TARGET_RUN],
            "source_seed": v.tags[TAG_SOURCE_SEED], "target_seed": v.tags[TAG_TARGET_SEED],
            "fit_run": v.tags[TAG_FIT_RUN], "model_id": model_id,
            "created": pd.Timestamp(v.creation_timestamp, unit="ms", tz="UTC"),
            **{key: metrics.get(key) for key in LISTED_METRICS},
        })
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["name", "version"], ignore_index=True)
