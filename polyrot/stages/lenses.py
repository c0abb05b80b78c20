"""Stage `lenses`: per-head circuit norms, ACDC-style head pruning and MLP activation patterns (§3, §6a).

For every run in --models:
  lens 1   |QK| and |OV| of each head on folded weights (polyrot.toy.lenses.head_norms)
  lens 3   each component's effective ablation loss, the mean-ablation effect on the summed
           per-head loss (polyrot.toy.causal; means on LENS_MEANS, effects on LENS_EVAL), and the heads
           ACDC keeps at --acdc-threshold (paper: 1e-3 keeps 6 of 8)
  lens 4   unique ReLU firing patterns and alive neurons per MLP layer on --lens4-sequences
           sequences (polyrot.toy.lenses.activation_patterns)

Metrics (<m> = s<seed>): <m>.L<l>H<h>.qk, <m>.L<l>H<h>.ov, <m>.effect.<component>, <m>.acdc.kept,
<m>.lens4.L<l>.{positions,unique_patterns,alive_neurons}.
Tags: polyrot.acdc.<m>.kept / polyrot.acdc.<m>.dropped (comma-separated component names).
Artifacts: lens1.csv (model x head: qk, ov, ablation effect, kept), effects.csv (model x component),
lens4.csv (model x layer).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from polyrot import tracking
from polyrot.stages import specs
from polyrot.stages.audit import parse_run_ids, seed_labels
from polyrot.stages.fit_rotation import seed_of
from polyrot.stages.train_seed import NAME as TRAIN_SEED
from polyrot.stages.train_seed import load_seed
from polyrot.toy import causal, lenses, task
from polyrot.toy.dyck import make_batch

STAGE = specs.LENSES
NAME = STAGE.name


def run(params: dict) -> str:
    run_ids = parse_run_ids(params["models"], "--models")
    # Everything that can be refused is checked before a run exists, so bad input leaves no run.
    labels = seed_labels({rid: seed_of(tracking.fetch_run(rid, TRAIN_SEED)) for rid in run_ids})
    at_checkpoint = f"@{params['checkpoint']}" if params["checkpoint"] else ""
    models = {rid: load_seed(rid, params["checkpoint"]) for rid in run_ids}
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    lens4_spec = dataclasses.replace(task.LENS4_SPEC, n_sequences=params["lens4_sequences"])
    means_batch, eval_batch, lens4_batch = (make_batch(spec) for spec in (task.LENS_MEANS, task.LENS_EVAL,
                                                                         lens4_spec))

    with tracking.stage_run(NAME, params, code_version=STAGE.code_version, experiment=params["experiment"],
                            upstream={f"model.{labels[rid]}": rid for rid in run_ids},
                            parent_run_id=params["parent_run"],
                            run_name=f"lenses-{','.join(labels.values())}" + at_checkpoint) as run:
        for prefix, spec in (("batch_means", task.LENS_MEANS), ("batch_eval", task.LENS_EVAL),
                             ("batch_lens4", lens4_spec)):
            run.log_params(spec.as_params(prefix))
        heads, effects, patterns = [], [], []
        for rid, model in models.items():
            label = labels[rid]
            _, effect = causal.ablation_effects(model, eval_batch,
                                                causal.component_means(model, means_batch))
            kept, dropped = causal.acdc_heads(effect, params["acdc_threshold"])
            norms = lenses.head_norms(model)
            norms["component"] = [f"attn_{l}_h{h}" for l, h in zip(norms["layer"], norms["head"])]
            norms["effect"] = norms["component"].map(effect)
            norms["kept"] = norms["component"].isin(kept)
            counts = lenses.activation_patterns(model, lens4_batch)
            heads.append(norms.assign(model=label))
            effects.append(pd.DataFrame({"model": label, "component": list(effect), "effect": list(effect.values())}))
            patterns.append(counts.assign(model=label))

            metrics = {f"{label}.acdc.kept": len(kept)}
            for row in norms.to_dict("records"):
                metrics |= {f"{label}.L{row['layer']}H{row['head']}.qk": row["qk"],
                            f"{label}.L{row['layer']}H{row['head']}.ov": row["ov"]}
            metrics |= {f"{label}.effect.{name}": value for name, value in effect.items()}
            for row in counts.to_dict("records"):
                metrics |= {f"{label}.lens4.L{row['layer']}.{k}": row[k]
                            for k in ("positions", "unique_patterns", "alive_neurons")}
            run.log_metrics(metrics)
            run.set_tags({f"polyrot.acdc.{label}.kept": ",".join(kept) or "-",
                          f"polyrot.acdc.{label}.dropped": ",".join(dropped) or "-"})
        for path, parts in (("lens1.csv", heads), ("effects.csv", effects), ("lens4.csv", patterns)):
            pd.concat(parts, ignore_index=True).to_csv(run.path(path), index=False)
            run.log_artifact(path)
        return run.run_id
