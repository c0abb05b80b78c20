"""Stage `hf_attribution`: IG vs AP per block of a Hugging Face causal LM (the paper's appendix D).

For every block, its output residual is replaced by its mean over the sample's (sequence, token)
positions and the change of the mean next-token cross-entropy is measured; attribution patching
and integrated gradients (--ig-steps path points, polyrot.toy.causal) predict that change from
gradients at the clean run. The model and sample are given as for hf_activations (the paper:
pythia-70m-seed1 at step143000, 8 x 128 tokens, 32 steps).

Artifacts:
  attribution.csv    one row per block: measured, ap, ig (nats)
Metrics: clean_loss, <block>.{measured,ap,ig}, r_ap and r_ig (Pearson r of each predictor against
the measured effects over the blocks).
"""

from __future__ import annotations

from polyrot import tracking
from polyrot.core.attribution import pearson
from polyrot.hf import lm
from polyrot.stages import specs
from polyrot.stages.hf_activations import default_label, load_model, resolved_params

STAGE = specs.HF_ATTRIBUTION
NAME = STAGE.name


def run(params: dict) -> str:
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    model, tokens, sample = load_model(params)
    label = default_label(sample["name"], sample["revision"])
    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream=sample["upstream"], parent_run_id=params["parent_run"],
                            run_name=f"attribution-{label}", tags={"polyrot.seed": label}) as run:
        run.log_params(resolved_params(model, sample))
        clean_loss, table = lm.block_attribution(model, tokens, ig_steps=params["ig_steps"])
        table.to_csv(run.path("attribution.csv"), index=False)
        run.log_artifact("attribution.csv")
        run.log_metrics({"clean_loss": clean_loss,
                         "r_ap": pearson(table["ap"], table["measured"]),
                         "r_ig": pearson(table["ig"], table["measured"]),
                         **{f"{row['block']}.{k}": row[k] for row in table.to_dict("records")
                            for k in ("measured", "ap", "ig")}})
        return run.run_id
