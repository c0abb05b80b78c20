"""Stage `audit`: how a source seed's SAEs transfer to other seeds, raw and rotated (paper §8).

For every site with a source SAE and every target model, on one batch (default: the paper's
evaluation batch), one row of audit.csv:

  sae_self_ev, sae_raw_ev,      the source SAE's EV on the source's activations, on the target's as
  sae_rotated_ev                they are, and on the target's mapped into the source frame
  sae_rotated_gap               sae_self_ev - sae_rotated_ev
  sae_gaussian_ev               on Gaussian samples with the source activations' mean and
                                covariance: the paper's noise baseline as its code computes it
  sae_gaussian_target_ev        the same with the target's mean and covariance (the wording of the
                                paper's docstring): second-order statistics alone, in the raw basis
  firing_{raw,rotated}_*        per-feature Pearson r between the source SAE's latents on source
                                rows and on (raw / rotated) target rows: mean, frac_above 0.5
  decoder_{raw,rotated}_*       cosine between the source SAE's decoder columns and those of an
                                SAE trained on the target (--target-saes), in the target's own
                                basis (what the paper reports) and mapped into the source frame;
                                max_*: each target feature's best match (the paper's code),
                                hungarian_*: one-to-one matching (the paper's text)
  rotation_ev, identity_ev,     activation-level fit quality (polyrot.core.rotation.fit_quality): the
  raw_ev                        fraction of the source's variance the mapped target explains
  frob_ratio, ks_pvalue, ...    polyrot.core.rotation.rotation_statistics of R
  src_/tgt_participation_ratio, polyrot.core.rotation.determinacy: how far the batch determines R —
  src_/tgt_dims_99, det_*,      effective rank of both sides, the rotation statistics on R's
  weighted_frob_ratio, split_*  determined part (det_k directions) and split-half stability
  map_<map>_ev, map_<map>_sae_ev  which map suffices (polyrot.core.maps): each map fitted on one half
                                of the rows, and on the other half the EV of the mapped target
                                activations as the source's, and the source SAE's EV on them
  cka                           linear CKA of the two sites' activations
  decoder_{source,target}_init_cos, decoder_shared_init   with --target-saes: each SAE's mean decoder
                                cosine to its own initialisation (polyrot.core.sae.decoder_drift)
                                and whether the two SAEs started from one initialisation (the
                                reference code's protocol: every SAE seeded 0)

Rotations are fit here, on the audited batch, rather than fetched from fit_rotation runs: the audit
needs both activation sets anyway, a fit costs milliseconds at d = 64, and the numbers then
describe exactly the rotation that was applied.

Null control (--null A,B): two untrained models with the source's config, built in memory from
DyckTransformer(seed=A) and (seed=B) (at initialisation every RMSNorm gain is 1: they are already
folded), get the same rows with kind=untrained. Their SAEs are trained here, on the untrained source's
activations on task.SAE_SPEC, with the source SAE's config at each site (--null-sae-steps
overrides its steps); there is no SAE of the untrained target, so no decoder cosine.

Planted nulls (--planted-nulls, on by default): the source's own activations as the target, rows
with kind and target named for the null (polyrot.core.nulls): planted_same_model (bf16-rounded: R
should be ~I on the determined part), planted_haar (turned by a known Haar rotation: the statistics
should call it Haar) and planted_angle (turned by a rotation with every eigen-angle at most
NULL_ANGLE: they should not). With --power-draws N, at each internal site the power curve of every
rotation statistic on the source's activations (power.csv, fig_power.png; metrics
power.<site>.angle.<statistic>, power.<site>.fixed.<statistic>, power.<site>.haar_rate.<statistic>,
power.<site>.uniformity_p.<statistic>; see polyrot.core.nulls).

Cross-checkpoint (--target-checkpoints): every target run is audited at each named checkpoint
("final" for its final weights) instead of at --checkpoint; the target label becomes
s<seed>-<checkpoint>. With the source run among the targets this measures how one run's basis
turns during training (the paper's §8.7, as a curve over checkpoints).

Hugging Face models (--source and --targets hf_activations runs, polyrot.hf): the stored
activations are the rows (source and targets must hold the same tokens, checked by digest), the
SAEs are train_sae runs on the source activations run itself, and there is no null pair or
checkpoint option (another revision's activations run is simply another target: step3000 ->
step143000 is the paper's cross-checkpoint pair; an untrained pair is an audit of two step0
revisions, as projects/neox-tiny.yaml runs it). With --target-saes, decoder_pairs.csv holds the
decoder cosine of every pair of models at every site (the paper's 36 pairs of 9 Pythia seeds).

Internal sites are all but the embedding, resid_pre_0 (layer0_resid_pre for Hugging Face models):
bit-shared in Cohort A, and of low rank, so that R is arbitrary off its span. Pooled statistics
and figure 2 use the internal sites (all sites if the audit has no other).

Artifacts:
  audit.csv                     one row per site x target (kind trained or untrained)
  summary.csv                   with --null: per quantity, its range over trained and untrained rows
                                at internal sites, whether the two ranges are disjoint and in which
                                direction (trained above / trained below / overlap)
  fig1_ev_by_site.png           self / raw / rotated / Gaussian EV per site (the paper's figure 1)
  fig2_eigen_angles.png         pooled eigen-angles of R against Haar O(d) (figure 2)
  fig2_determined_angles.png    the same on the determined part R_det, against Haar O(k), with the
                                untrained pair's and the planted nulls'
  fig_which_map.png             EV of each map per site, held-out rows (mean over targets)
  power.csv, fig_power.png      with --power-draws: rejection rate against the departure from Haar
  decoder_pairs.csv             hf_activations runs with --target-saes: decoder cosine of every pair
                                of models per site
  fig_cross_checkpoint.png      with --target-checkpoints: ||R - I||_F, raw and rotated EV per site
                                against the target checkpoint
Metrics: <site>.<target>.<column> (target = s<seed>, or untrained), pooled.<kind>.*, and with
--null separates.<quantity> (1 when the trained and untrained ranges are disjoint) and
separates_direction.<quantity> (+1 trained above, -1 trained below, 0 overlap).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from polyrot import tracking
from polyrot.core import nulls
from polyrot.core.maps import held_out_maps, linear_cka
from polyrot.core.metrics import decoder_cosine, firing_correlation, firing_summary
from polyrot.core.rotation import (
    Rotation,
    determinacy,
    determined_part,
    eigen_angles,
    fit_rotation,
    haar_angles,
    haar_rotation,
    one_blas_thread,
    pooled_statistics,
    restrict,
    rotation_statistics,
    small_angle_rotation,
)
from polyrot.core.sae import (
    SAEConfig,
    SparseAutoencoder,
    decoder_drift,
    evaluate_sae,
    train_sae,
)
from polyrot.errors import LineageError, ParameterError
from polyrot.figures.audit import checkpoint_curve, eigen_angle_histogram, ev_by_site
from polyrot.figures.nulls import (
    determined_angle_histogram,
    power_figure,
    which_map_chart,
)
from polyrot.hf import lm
from polyrot.stages import specs
from polyrot.stages.base import (
    batch_spec,
)
from polyrot.stages.fit_rotation import FIT_QUALITY, check_same_d_model, seed_of
from polyrot.stages.hf_activations import is_hf_run, load_hf_activations
from polyrot.stages.train_sae import load_trained_sae, sae_runs
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy.activations import extract
from polyrot.toy.dyck import make_batch
from polyrot.toy.model import DyckTransformer, site_names
from polyrot.toy.task import EVAL_SPEC, SAE_SPEC

STAGE = specs.AUDIT
NAME = STAGE.name
# Not "null": pandas reads that back from a CSV as NaN.
TRAINED, UNTRAINED = "trained", "untrained"
EMBEDDING_SITE = "resid_pre_0"
# The embedding sites of both model families (polyrot.toy.model, polyrot.hf).
EMBEDDING_SITES = (EMBEDDING_SITE, "layer0_resid_pre")
# Haar reference of the pooled KS test and of figure 2: the paper's 10 draws, rng 31.
N_HAAR, HAAR_SEED = 10, 31
FINAL = "final"
DECODER_KEYS = ("max_mean", "max_frac_above", "hungarian_mean", "hungarian_frac_above")
# The planted nulls (module doc): their kind is also their target label.
# Named planted_*: a target label starting with "s" would match the claims' s* (trained seed) globs.
SAME_MODEL, PLANTED_HAAR, PLANTED_ANGLE = "planted_same_model", "planted_haar", "planted_angle"
PLANTED = (SAME_MODEL, PLANTED_HAAR, PLANTED_ANGLE)
NULL_ANGLE = 0.5       # radians: the largest eigen-angle of planted_angle's rotation
PLANTED_SEED = 2024    # seed of the planted rotations
SPLIT_SEED = 0         # seed of the split into halves (split-half stability, held-out maps)


def parse_run_ids(raw: str, flag: str) -> list[str]:
    ids = list(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
    if not ids:
        raise ParameterError(f"{flag} names no run")
    return ids


def parse_checkpoints(raw: str) -> list[str | None]:
    """Checkpoint names from --target-checkpoints; "final" stands for the final weights (None)."""
    names = list(dict.fromkeys(x.strip() for x in raw.split(",") if x.strip()))
    if not names:
        raise ParameterError("--target-checkpoints names no checkpoint")
    return [None if name == FINAL else name for name in names]


def parse_null_seeds(raw: str) -> tuple[int, int]:
    parts = [x.strip() for x in raw.split(",")]
    if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts) or parts[0] == parts[1]:
        raise ParameterError(f"--null takes two different integer seeds 'A,B', got {raw!r}")
    return int(parts[0]), int(parts[1])


def _saes(raw: str, flag: str, models: Mapping[str, int],
          checkpoint: str | None = None) -> dict[tuple[str, str], tuple[str, SparseAutoencoder]]:
    """{(model run, site): (train_sae run, SAE)} for the runs in `raw`, each an SAE on one of `models`
    ({model run: d_model}; at `checkpoint`, or their final weights)."""
    found = {}
    for rid in parse_run_ids(raw, flag):
        for run_id in sae_runs(rid).values():
            sae = load_trained_sae(run_id)
            cfg = sae.cfg
            if cfg.kind != "sae":
                raise ParameterError(f"{flag}: run {run_id} trained a {cfg.kind}, not an SAE")
            if cfg.model_run_id not in models:
                raise LineageError(f"{flag}: SAE run {run_id} was trained on model run {cfg.model_run_id}, "
                                   f"not on {' or '.join(models)}")
            if cfg.model_checkpoint != checkpoint:
                raise LineageError(f"{flag}: SAE run {run_id} was trained on "
                                   f"{cfg.model_checkpoint or 'the final weights'} of its model, the audit reads "
                                   f"{checkpoint or 'the final weights'}")
            d_model = models[cfg.model_run_id]
            if cfg.d_in != d_model:
                raise ParameterError(f"{flag}: SAE run {run_id} reads {cfg.site}, {cfg.d_in} wide; the audit rotates "
                                     f"the residual stream, so its SAEs must read d_model={d_model}-wide sites")
            key = (cfg.model_run_id, cfg.site)
            if key in found:
                raise ParameterError(f"{flag}: runs {found[key][0]} and {run_id} are both SAEs of {cfg.site} "
                                     f"on model run {cfg.model_run_id}")
            found[key] = (run_id, sae)
    return found


def unique_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Each run's label, plus the run ID's start where two runs share one: metric keys stay apart."""
    counts = Counter(labels.values())
    return {rid: label if counts[label] == 1 else f"{label}-{rid[:8]}" for rid, label in labels.items()}


def seed_labels(seeds: Mapping[str, str]) -> dict[str, str]:
    """Metric-key label of each target run: s<seed>, plus the run ID's start where seeds repeat."""
    return unique_labels({rid: f"s{seed}" for rid, seed in seeds.items()})


def gaussian_like(acts: torch.Tensor, seed: int) -> torch.Tensor:
    """As many Gaussian rows as `acts`, with its mean and covariance, drawn from `seed`.

    The covariance is factored by its eigendecomposition, not Cholesky: at resid_pre_0 it is
    singular (the embedding spans ~15 of 64 dimensions).
    """
    x = acts.to(torch.float64)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    factor = evecs * evals.clamp_min(0.0).sqrt()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x.mean(dim=0) + noise @ factor.T).to(acts.dtype)


@torch.no_grad()
@one_blas_thread
def transfer_row(sae: SparseAutoencoder, acts_src: torch.Tensor, acts_tgt: torch.Tensor, rotation: Rotation, *,
                 gaussian_seed: int, target_sae: SparseAutoencoder | None = None) -> dict:
    """Every per-(site, target) number of the audit except the row's labels (see the module doc)."""
    mapped = rotation.apply(acts_tgt)
    row = {name: evaluate_sae(sae, acts)["ev"] for name, acts in (
        ("sae_self_ev", acts_src), ("sae_raw_ev", acts_tgt), ("sae_rotated_ev", mapped),
        ("sae_gaussian_ev", gaussian_like(acts_src, gaussian_seed)),
        ("sae_gaussian_target_ev", gaussian_like(acts_tgt, gaussian_seed)))}
    row["sae_rotated_gap"] = row["sae_self_ev"] - row["sae_rotated_ev"]
    latents = sae.encode(acts_src)
    for name, acts in (("raw", acts_tgt), ("rotated", mapped)):
        summary = firing_summary(firing_correlation(latents, sae.encode(acts)))
        row[f"firing_{name}_mean"], row[f"firing_{name}_frac_above"] = summary["mean"], summary["frac_above"]
    if target_sae is not None:
        W_tgt = target_sae.W_dec.detach()
        # Decoder columns are directions, so only R (no translation) takes them to the source frame.
        for name, W in (("raw", W_tgt), ("rotated", rotation.to_source(W_tgt.T).T)):
            cosine = decoder_cosine(sae.W_dec.detach(), W)
            row.update({f"decoder_{name}_{key}": cosine[key] for key in DECODER_KEYS})
        row["decoder_source_init_cos"] = decoder_drift(sae)["init_cos_mean"]
        row["decoder_target_init_cos"] = decoder_drift(target_sae)["init_cos_mean"]
        row["decoder_shared_init"] = float(sae.cfg.seed == target_sae.cfg.seed and sae.cfg.d_sae == target_sae.cfg.d_sae)
    return {**row, **{k: rotation.metadata[k] for k in FIT_QUALITY}, **rotation_statistics(rotation),
            **determinacy(acts_src, acts_tgt, rotation.R, seed=SPLIT_SEED, haar_seed=HAAR_SEED, n_haar=N_HAAR),
            **which_map(sae, acts_src, acts_tgt)}


@torch.no_grad()
def which_map(sae: SparseAutoencoder, acts_src: torch.Tensor, acts_tgt: torch.Tensor) -> dict:
    """map_<map>_ev and map_<map>_sae_ev for every map of polyrot.core.maps on held-out rows, and cka."""
    evs, mapped, _ = held_out_maps(acts_src, acts_tgt, seed=SPLIT_SEED)
    row = {f"map_{kind}_ev": ev for kind, ev in evs.items()}
    row.update({f"map_{kind}_sae_ev": evaluate_sae(sae, torch.from_numpy(rows).to(acts_src.dtype))["ev"]
                for kind, rows in mapped.items()})
    row["cka"] = linear_cka(acts_src, acts_tgt)
    return row


@one_blas_thread
def fit(acts_src: torch.Tensor, acts_tgt: torch.Tensor, site: str) -> Rotation:
    """The audit's rotation of one pair and site; its metadata carries the site and the eigen-angles
    of its determined part (det_angles, for figure 2's determined panel)."""
    part = determined_part(acts_src, acts_tgt)
    rotation = fit_rotation(acts_src, acts_tgt, metadata={"site": site})
    rotation.metadata["det_angles"] = eigen_angles(restrict(rotation.R, part)).tolist()
    return rotation


def planted_targets(acts: torch.Tensor) -> dict[str, torch.Tensor]:
    """{null kind: target rows} for the planted nulls on a source's activations (module doc)."""
    x = acts.to(torch.float64)
    d = x.shape[1]
    _, same = nulls.same_model_pair(x)
    turned = {PLANTED_HAAR: haar_rotation(d, PLANTED_SEED), PLANTED_ANGLE: small_angle_rotation(d, NULL_ANGLE, PLANTED_SEED)}
    found = {SAME_MODEL: torch.from_numpy(same)}
    found.update({kind: torch.from_numpy(nulls.planted_pair(x, Q)[1]) for kind, Q in turned.items()})
    return {kind: rows.to(acts.dtype) for kind, rows in found.items()}


def planted_rows(saes: Mapping[str, SparseAutoencoder], acts_src: Mapping[str, torch.Tensor], source_seed, *,
                 gaussian_seed: int) -> tuple[list[dict], dict[str, list[Rotation]]]:
    """The planted nulls' audit rows at every site (the source is both sides), and their rotations by kind."""
    rows, rotations = [], {kind: [] for kind in PLANTED}
    for site, sae in saes.items():
        for kind, target in planted_targets(acts_src[site]).items():
            rotation = fit(acts_src[site], target, site)
            rotations[kind].append(rotation)
            rows.append({"site": site, "kind": kind, "target": kind, "source_seed": source_seed,
                         "target_seed": source_seed, **transfer_row(sae, acts_src[site], target, rotation, gaussian_seed=gaussian_seed)})
    return rows, rotations


def power_table(acts_src: Mapping[str, torch.Tensor], draws: int) -> pd.DataFrame:
    """The power curve of every rotation statistic at each internal site, on the source's activations."""
    internal = [site for site in acts_src if site not in EMBEDDING_SITES] or list(acts_src)
    references = nulls.References(n_haar=N_HAAR, seed=HAAR_SEED)
    return pd.concat([nulls.power_curve(acts_src[site], draws=draws, seed=PLANTED_SEED, references=references)
                      .assign(site=site) for site in internal], ignore_index=True)


def power_metrics(table: pd.DataFrame) -> dict[str, float]:
    out = {}
    for site, rows in table.groupby("site", sort=False):
        out.update({f"power.{site}.{key}": value for key, value in nulls.detection(rows).items()})
        out.update({f"power.{site}.haar_rate.{k}": v for k, v in nulls.null_size(rows).items()})
        haar = rows[rows["kind"] == "haar"]
        out.update({f"power.{site}.uniformity_p.{k}": v for k, v in zip(haar["statistic"], haar["uniformity_p"])})
    return out


def _null_saes(model: DyckTransformer, sources: Mapping[str, SparseAutoencoder], steps: int | None) -> dict:
    """{site: SAE} trained on the untrained source, each with the config of the trained source's SAE."""
    data = extract(model, SAE_SPEC, list(sources))
    return {site: train_sae(data[site], SAEConfig(**{**sae.cfg.to_dict(), "steps": steps or sae.cfg.steps,
                                                      "model_run_id": None}), progress=False)[0]
            for site, sae in sources.items()}


def _pooled(rotations: list[Rotation]) -> list[Rotation]:
    internal = [r for r in rotations if r.metadata["site"] not in EMBEDDING_SITES]
    return internal or rotations


def separation(table: pd.DataFrame) -> pd.DataFrame:
    """Per numeric quantity, its range over trained and over untrained rows at internal sites, and
    whether the ranges are disjoint: the figures that tell trained seeds from untrained ones."""
    internal = table[table["site"] != EMBEDDING_SITE]
    if internal.empty:
        internal = table
    rows = []
    for quantity in table.select_dtypes("number").columns:
        trained, untrained = (internal.loc[internal["kind"] == kind, quantity].dropna()
                              for kind in (TRAINED, UNTRAINED))
        if trained.empty or untrained.empty:
            continue
        rows.append({"quantity": quantity, "trained_min": trained.min(), "trained_max": trained.max(),
                     "untrained_min": untrained.min(), "untrained_max": untrained.max(),
                     "separates": bool(trained.min() > untrained.max() or trained.max() < untrained.min()),
                     "direction": ("trained above" if trained.min() > untrained.max() else
                                   "trained below" if trained.max() < untrained.min() else "overlap")})
    return pd.DataFrame(rows)


DIRECTION_SIGN = {"trained above": 1.0, "trained below": -1.0, "overlap": 0.0}


def _log_results(run, table: pd.DataFrame, rotations: dict[str, list[Rotation]], d_model: int, *, null: bool,
                 checkpoints: bool, acts_src: Mapping[str, torch.Tensor], power_draws: int) -> None:
    """audit.csv, its metrics, the pooled statistics, summary.csv (with a null pair) and the figures."""
    table.to_csv(run.path("audit.csv"), index=False)
    run.log_artifact("audit.csv")
    numeric = table.select_dtypes("number").columns
    run.log_metrics({f"{row['site']}.{row['target']}.{column}": row[column]
                     for row in table.to_dict("records") for column in numeric if pd.notna(row[column])})

    pooled = {kind: _pooled(found) for kind, found in rotations.items() if found}
    statistics = {kind: pooled_statistics(found, haar_seed=HAAR_SEED, n_haar=N_HAAR)
                  for kind, found in pooled.items()}
    run.log_metrics({f"pooled.{kind}.{k}": v for kind, stats in statistics.items() for k, v in stats.items()})
    if null:
        summary = separation(table)
        summary.to_csv(run.path("summary.csv"), index=False)
        run.log_artifact("summary.csv")
        run.log_metrics({f"separates.{q}": float(s) for q, s in zip(summary["quantity"], summary["separates"])})
        run.log_metrics({f"separates_direction.{q}": DIRECTION_SIGN[s]
                         for q, s in zip(summary["quantity"], summary["direction"])})
    if power_draws:
        power = power_table(acts_src, power_draws)
        power.to_csv(run.path("power.csv"), index=False)
        run.log_artifact("power.csv")
        run.log_metrics(power_metrics(power))
        run.log_figure("fig_power.png", power_figure(power))

    run.log_figure("fig1_ev_by_site.png", ev_by_site(table[table["kind"] == TRAINED]))
    if checkpoints:
        run.log_figure("fig_cross_checkpoint.png", checkpoint_curve(table[table["kind"] == TRAINED]))
    angles = {kind: np.concatenate([eigen_angles(r.R) for r in found]) for kind, found in pooled.items()}
    ks = {"statistic": statistics[TRAINED]["ks_statistic"], "pvalue": statistics[TRAINED]["ks_pvalue"]}
    n_sites = len({r.metadata["site"] for r in pooled[TRAINED]})
    n_targets = len(pooled[TRAINED]) // n_sites
    run.log_figure("fig2_eigen_angles.png", eigen_angle_histogram(
        angles[TRAINED], haar_angles(d_model, N_HAAR, HAAR_SEED), ks, angles.get(UNTRAINED), d=d_model,
        pooled=f"{n_sites} site{'s' * (n_sites > 1)} x {n_targets} target{'s' * (n_targets > 1)}"))
    run.log_figure("fig2_determined_angles.png", determined_angle_histogram(
        {kind: [np.asarray(r.metadata["det_angles"]) for r in found] for kind, found in pooled.items()},
        haar_seed=HAAR_SEED, n_haar=N_HAAR))
    run.log_figure("fig_which_map.png", which_map_chart(table[table["kind"] == TRAINED]))



def decoder_pairs(saes: Mapping[str, Mapping[str, SparseAutoencoder]]) -> pd.DataFrame:
    """Decoder cosine over every pair of models at every site ({site: {label: SAE}}), each in its
    own basis: of b's features, the fraction whose best cosine to a's exceeds 0.5 (the paper's
    all-36-pairs number for Pythia) and the mean best cosine."""
    rows = []
    for site, by_label in saes.items():
        for a, b in itertools.combinations(by_label, 2):
            cosine = decoder_cosine(by_label[a].W_dec.detach(), by_label[b].W_dec.detach())
            rows.append({"site": site, "model_a": a, "model_b": b,
                         **{f"decoder_{key}": cosine[key] for key in DECODER_KEYS}})
    return pd.DataFrame(rows)


def _run_hf(params: dict) -> str:
    """The audit on stored hf_activations runs: the rows, rotations and figures of `run`, no null pair."""
    source = params["source"]
    refused = [o for o in ("null", "null_sae_steps", "checkpoint", "target_checkpoints") if params[o]]
    if refused:
        raise ParameterError(f"--{refused[0].replace('_', '-')} applies to train_seed runs; with hf_activations runs "
                             "audit another revision by giving its activations run as a target")
    if batch_spec(params) != EVAL_SPEC:
        raise ParameterError("--batch-* describe a Dyck batch; hf_activations runs bring their own rows")
    acts_src, info = load_hf_activations(source)
    found = _saes(params["saes"], "--saes", {source: info["d_model"]})
    saes = {site: found[source, site] for site in lm.site_names(info["n_layers"]) if (source, site) in found}
    targets = {}
    for rid in parse_run_ids(params["targets"], "--targets"):
        acts, target_info = load_hf_activations(rid)
        if target_info["tokens_sha256"] != info["tokens_sha256"]:
            raise ParameterError(f"target run {rid} ran on other tokens than source run {source}: the audit compares "
                                 "them row by row, so both need one corpus, tokenizer, seed and sample size")
        if target_info["d_model"] != info["d_model"]:
            raise ParameterError(f"source run {source} has d_model {info['d_model']} but target run {rid} has "
                                 f"{target_info['d_model']}: no rotation maps one residual stream onto the other")
        missing = [site for site in saes if site not in acts]
        if missing:
            raise ParameterError(f"target run {rid} has no site {missing[0]!r}; it has: {', '.join(acts)}")
        targets[rid] = (target_info["label"], acts)
    labels = unique_labels({rid: label for rid, (label, _) in targets.items()})
    target_saes = _saes(params["target_saes"], "--target-saes", {rid: info["d_model"] for rid in targets}) \
        if params["target_saes"] else {}
    if params["threads"]:
        torch.set_num_threads(params["threads"])

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"source": source, **{f"target.{labels[rid]}": rid for rid in targets}},
                            parent_run_id=params["parent_run"],
                            run_name=f"audit-{info['label']}-vs-{','.join(labels.values())}",
                            tags={"polyrot.source_seed": info["label"]}) as run:
        rows, rotations = [], {TRAINED: []}
        for rid, (_, acts_tgt) in targets.items():
            for site, (sae_run, sae) in saes.items():
                target_sae_run, target_sae = target_saes.get((rid, site), (None, None))
                rotation = fit(acts_src[site], acts_tgt[site], site)
                rotations[TRAINED].append(rotation)
                rows.append({"site": site, "kind": TRAINED, "target": labels[rid], "source_run": source,
                             "target_run": rid, "source_seed": info["label"], "target_seed": targets[rid][0],
                             "sae_run": sae_run, "target_sae_run": target_sae_run,
                             **transfer_row(sae, acts_src[site], acts_tgt[site], rotation,
                                            gaussian_seed=params["gaussian_seed"], target_sae=target_sae)})
        if params["planted_nulls"]:
            found, planted = planted_rows({site: sae for site, (_, sae) in saes.items()}, acts_src, info["label"],
                                          gaussian_seed=params["gaussian_seed"])
            rows += found
            rotations.update(planted)
        _log_results(run, pd.DataFrame(rows), rotations, info["d_model"], null=False, checkpoints=False,
                     acts_src={site: acts_src[site] for site in saes}, power_draws=params["power_draws"])
        if target_saes:
            by_site = {site: {info["label"]: sae, **{labels[rid]: target_saes[rid, site][1] for rid in targets
                                                       if (rid, site) in target_saes}}
                       for site, (_, sae) in saes.items()}
            pairs = decoder_pairs(by_site)
            pairs.to_csv(run.path("decoder_pairs.csv"), index=False)
            run.log_artifact("decoder_pairs.csv")
            run.log_metrics({f"{site}.all_pairs.decoder_max_frac_above": group["decoder_max_frac_above"].mean()
                             for site, group in pairs.groupby("site")})
        return run.run_id


def run(params: dict) -> str:
    source = params["source"]
    if is_hf_run(source):
        return _run_hf(params)
    spec = batch_spec(params)
    null_seeds = parse_null_seeds(params["null"]) if params["null"] else None
    if params["null_sae_steps"] and not null_seeds:
        raise ParameterError("--null-sae-steps sets the untrained pair's SAE steps: it needs --null")
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    source_seed = seed_of(tracking.fetch_run(source, TRAIN_SEED))
    checkpoint = params["checkpoint"]
    source_model = load_seed(source, checkpoint)
    found = _saes(params["saes"], "--saes", {source: source_model.cfg.d_model}, checkpoint)
    saes = {site: found[source, site] for site in site_names(source_model.cfg) if (source, site) in found}
    target_runs = parse_run_ids(params["targets"], "--targets")
    checkpoints = parse_checkpoints(params["target_checkpoints"]) if params["target_checkpoints"] else None
    if checkpoints and params["target_saes"]:
        raise ParameterError("--target-saes are SAEs of one checkpoint: they cannot go with --target-checkpoints")
    target_seeds = {rid: seed_of(tracking.fetch_run(rid, TRAIN_SEED)) for rid in target_runs}
    run_labels = seed_labels(target_seeds)
    # (label, run ID, checkpoint, model): one per target run, or per target run and checkpoint.
    targets = [(run_labels[rid], rid, checkpoint, load_seed(rid, checkpoint)) for rid in target_runs] \
        if checkpoints is None else [(f"{run_labels[rid]}-{ckpt or FINAL}", rid, ckpt, load_seed(rid, ckpt))
                                     for rid in target_runs for ckpt in checkpoints]
    for _, rid, _, model in targets:
        check_same_d_model(source, source_model, rid, model)
    target_saes = (_saes(params["target_saes"], "--target-saes", {rid: m.cfg.d_model for _, rid, _, m in targets},
                         checkpoint)
                   if params["target_saes"] else {})
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    sites = list(saes)

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={"source": source, **{f"target.{run_labels[rid]}": rid for rid in target_runs}},
                            parent_run_id=params["parent_run"],
                            run_name=f"audit-s{source_seed}{f'@{checkpoint}' if checkpoint else ''}-vs-"
                                     f"{','.join(run_labels[rid] for rid in target_runs)}"
                                     f"{f' ({len(checkpoints)} checkpoints)' if checkpoints else ''}",
                            tags={"polyrot.source_seed": source_seed}) as run:
        batch = make_batch(spec)
        acts_src = extract(source_model, batch, sites)
        rows, rotations = [], {TRAINED: [], UNTRAINED: []}
        for label, rid, target_checkpoint, model in targets:
            acts_tgt = extract(model, batch, sites)
            for site in sites:
                sae_run, sae = saes[site]
                target_sae_run, target_sae = target_saes.get((rid, site), (None, None))
                rotation = fit(acts_src[site], acts_tgt[site], site)
                rotations[TRAINED].append(rotation)
                rows.append({"site": site, "kind": TRAINED, "target": label, "source_run": source,
                             "target_run": rid, "target_checkpoint": target_checkpoint or FINAL,
                             "source_seed": source_seed, "target_seed": target_seeds[rid],
                             "sae_run": sae_run, "target_sae_run": target_sae_run,
                             **transfer_row(sae, acts_src[site], acts_tgt[site], rotation,
                                            gaussian_seed=params["gaussian_seed"], target_sae=target_sae)})
        if null_seeds:
            null_source, null_target = (DyckTransformer(source_model.cfg, seed=s) for s in null_seeds)
            null_saes = _null_saes(null_source, {site: sae for site, (_, sae) in saes.items()},
                                   params["null_sae_steps"])
            null_src, null_tgt = extract(null_source, batch, sites), extract(null_target, batch, sites)
            for site in sites:
                rotation = fit(null_src[site], null_tgt[site], site)
                rotations[UNTRAINED].append(rotation)
                rows.append({"site": site, "kind": UNTRAINED, "target": UNTRAINED, "source_seed": str(null_seeds[0]),
                             "target_seed": str(null_seeds[1]),
                             **transfer_row(null_saes[site], null_src[site], null_tgt[site], rotation,
                                            gaussian_seed=params["gaussian_seed"])})
        if params["planted_nulls"]:
            found, planted = planted_rows({site: sae for site, (_, sae) in saes.items()}, acts_src, source_seed,
                                          gaussian_seed=params["gaussian_seed"])
            rows += found
            rotations.update(planted)
        _log_results(run, pd.DataFrame(rows), rotations, source_model.cfg.d_model, null=bool(null_seeds),
                     acts_src=acts_src, power_draws=params["power_draws"],
                     checkpoints=bool(checkpoints))
        return run.run_id
