"""Every stage's specification: its name, options, help and code version, in one place.

The click CLI builds one subcommand per Stage here and `polyrot mlproject` writes the MLproject
entry points from the same objects, so the two cannot drift apart. Nothing here imports torch,
mlflow, transformers or matplotlib: a stage's module (`polyrot.stages.<name>`, or the one its
spec names) loads only when the stage runs, so `polyrot --help` answers at once.

Defaults come from the worlds' plain-data modules (polyrot.toy.task, polyrot.toy.recipe,
polyrot.hf.config, polyrot.core.sae_config), never from a copy of their numbers.
"""

from __future__ import annotations

from polyrot.core.precision import PRECISIONS
from polyrot.core.sae_config import KINDS, SAEConfig
from polyrot.hf.config import CORPUS_SEED, DTYPES, PAPER_CORPUS, NeoxRecipe
from polyrot.stages.base import (
    PARENT_RUN,
    REQUIRED,
    Option,
    Stage,
    batch_options,
    non_negative,
    positive,
)
from polyrot.toy import task
from polyrot.toy.recipe import PROFILES, RANGES, TrainConfig, range_problem
from polyrot.toy.task import EVAL_SPEC, SAE_SPEC

# The paper's analysis constants that more than one stage exposes as an option default.
IG_STEPS = 32            # integrated-gradients path points (bars and the Pythia attribution, §7)
ACDC_THRESHOLD = 1e-3    # effective ablation loss a head must exceed to survive ACDC pruning (lens 3)
BARS_SAMPLES = 32768     # Bar B sequences: 16 batches of 2048 (paper: 10^7); 20-80 s per model on one core
STEERING_ALPHAS = "0.5,1,2,4"  # the paper's doses
HF_STEERING_SEQUENCES = 64     # sequences of a Hugging Face source's sample steering is measured on (§6g)

THREADS = Option("threads", int, 0, "torch threads (0: torch's default)", check=non_negative)
CHECKPOINT = Option("checkpoint", str, None, "use this checkpoint of the train_seed runs (first-0.99, "
                    "step-002000, ...) instead of their final weights")
# A Hugging Face model and its corpus sample: hf_activations and hf_attribution load models alike.
HF_MODEL_OPTIONS = (
    Option("model", str, None, "hub name (EleutherAI/pythia-70m-seed1) or local folder of a causal LM"),
    Option("model_run", str, None, "train_neox run ID whose stored revisions are loaded (instead of --model)",
           run_ids=True),
    Option("revision", str, None, "hub branch, tag or commit (step143000, step3000, ...); default main"),
    Option("cache_dir", str, None, "hub cache to resolve --model in; default huggingface_hub's"),
    Option("corpus", str, None, "hub dataset (streamed) or local text file; default: the paper's "
           f"{PAPER_CORPUS} for --model, the training corpus for --model-run"),
    Option("split", str, "train", "split of a hub corpus"),
    Option("text_field", str, "text", "field holding a hub corpus' text"),
)
# The symmetry search of polyrot.toy.symmetry.align (the paper's 16 starts x 6 iterations, then 400
# Cayley steps), for every stage that aligns one seed to another.
ALIGNMENT_OPTIONS = (
    Option("starts", int, 16, "head-permutation starts of the symmetry search", check=positive),
    Option("outer_iters", int, 6, "coordinate-descent iterations per start", check=positive),
    Option("cayley_iters", int, 400, "Cayley refinement steps of the residual rotation", check=non_negative),
)
HF_RUNTIME_OPTIONS = (
    Option("device", str, "auto", "torch device; auto: CUDA when present"),
    Option("dtype", str, "float32", "dtype the model runs in", choices=DTYPES),
    THREADS,
)


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


_PROFILE_RECIPES = {name: TrainConfig.from_profile(name) for name in PROFILES}


def recipe_option(name: str, kind: type, help: str) -> Option:
    """A training-recipe option: left unset it takes the profile's value, which its help names; its
    value is checked against the recipe's own range for that field."""
    values = {profile: _shown(getattr(recipe, name)) for profile, recipe in _PROFILE_RECIPES.items()}
    shown = (f"default {values['cpu']}" if len(set(values.values())) == 1
             else "; ".join(f"{profile}: {value}" for profile, value in values.items()))
    check = (lambda value: range_problem(name, value)) if name in RANGES else None
    return Option(name, kind, None, f"{help} ({shown})", check=check)


# The options of train_seed that override one field of the profile's TrainConfig.
RECIPE = (
    recipe_option("batch_size", int, "sequences per step"),
    recipe_option("max_steps", int, "step budget, which the cosine schedule spans"),
    recipe_option("lr", float, "peak learning rate"),
    recipe_option("min_lr_ratio", float, "the cosine's floor as a fraction of the peak"),
    recipe_option("eval_every", int, "steps between held-out evaluations"),
    recipe_option("target_acc", float, "early-stop target: min held-out accuracy over split x head"),
    recipe_option("extra_steps", int, "steps to continue after first confirming target_acc"),
    recipe_option("checkpoint_every", int, "steps between checkpoint artifacts"),
    recipe_option("p_corrupt", float, "fraction of valid walks given one wrong-family closer"),
    recipe_option("p_noise_tail", float, "fraction of the other valid walks that continue as uniform noise "
                  "from a random position: a violation deep in the stack, then a long tail"),
    recipe_option("p_open_spread", float, "each valid walk's opening probability drawn from 0.55 ± this; 0: "
                  "0.55 for all"),
    recipe_option("paper_mix_from", float, "fraction of max_steps from which the training batches are the "
                  "paper's mix (no corruption, noise tail or spread); 1: never"),
    recipe_option("bucketed", bool, "length-bucketed batches, the loss normalised per chunk; false: every "
                  "batch padded to the context"),
    recipe_option("ema_decay", float, "decay of the weights' moving average, kept when it evaluates better; "
                  "0: none"),
    recipe_option("late_batch_size", int, "sequences per step from late_batch_from x max_steps on; 0: "
                  "batch_size throughout"),
    recipe_option("late_batch_from", float, "fraction of max_steps after which late_batch_size applies"),
    recipe_option("precision", str, "fp32, or bf16: the training step under bf16 autocast with fp32 master "
                  "weights (the paper's), attention and the loss in fp32; evaluations read fp32"),
    recipe_option("eval_sequences", int, "held-out sequences per split at each evaluation, the paper's size"),
    recipe_option("confirm_sequences", int, "held-out sequences per split that confirm a milestone and score "
                  "the final model, ~10^6 tokens"),
)
RECIPE_OPTIONS = tuple(option.name for option in RECIPE)

TRAIN_SEED = Stage(
    "train_seed", "Train one Dyck-3 seed and log its model, checkpoints and accuracy.",
    (
        Option("seed", int, None, "model seed (init and data stream); default 0"),
        Option("profile", str, "cpu", "training recipe: cpu (2-core default) or paper", choices=tuple(PROFILES)),
        *RECIPE,
        Option("shared_io_from", str, None, "train_seed run ID whose W_E and unembeddings are copied and frozen (Cohort A)",
               run_ids=True),
        Option("resume", str, None, "train_seed run ID to continue from its last checkpoint; the recipe comes from "
               "it, but for a new --max-steps or --extra-steps (the cosine then spans the new budget)",
               run_ids=True),
        Option("threads", int, 0, "torch threads (0: torch's default); 1 makes training bit-reproducible",
               check=non_negative),
        Option("device", str, None, "cpu, cuda or cuda:N; default: CUDA when torch sees one, else the CPU"),
    ),
    code_version="8",  # 2: bucketed batches and the EMA in the cpu profile; the best evaluated model kept;
    # 3: p_noise_tail 0.25 in the cpu profile; a first-0.995 checkpoint; 4: p_open_spread 0.25 in it;
    # 5: final.draws.* (the paper's early-stop reading), the quick crossing, an error table at each
    # milestone (the weights are 4's); 6: the cpu profile's cosine floor at 0.25 of the peak; 7: its
    # last fifth on the paper's mix (paper_mix_from 0.8), violations.csv; 8: precision, bf16 autocast
    # in both profiles on every device (before: on CUDA only), attention in fp32
)


IMPORT_SEED = Stage(
    "import_seed", "Import a checkpoint of the paper's reference implementation as a seed run that every stage "
    "reading a train_seed run accepts.",
    (
        Option("path", str, REQUIRED, "torch.save checkpoint of the reference code (step, model_state, optim_state, "
               "cfg, metrics)", positional=True),
        Option("seed", int, None, "seed the checkpoint was trained as; default: N of a seeds/N/ folder in its path"),
        # The batch on which the imported model's logits must equal the reference forward's.
        *batch_options(EVAL_SPEC),
    ),
    code_version="1",
)


ACTIVATIONS = Stage(
    "activations", "Extract a model's activations at named sites on a batch spec and store them.",
    (
        Option("model_run", str, REQUIRED, "train_seed run ID whose model is run", run_ids=True),
        Option("sites", str, REQUIRED, "comma-separated sites, e.g. resid_mid_0,resid_mid_1"),
        *batch_options(EVAL_SPEC),
        Option("float16", bool, False, "store float16 (half the size; no longer bit-identical to recomputing)"),
        THREADS,
    ),
    code_version="1",
)


TRAIN_SAE = Stage(
    "train_sae", "Train an SAE or transcoder on a model's activations at one site (or several, grouped).",
    (
        Option("model_run", str, None, "train_seed run ID: activations are extracted on the fly", run_ids=True),
        Option("activations_run", str, None, "activations run ID to train on (instead of --model-run)", run_ids=True),
        Option("site", str, None, "site to train on, e.g. resid_mid_1"),
        Option("sites", str, None, "comma-separated sites: one child run per site under a group run"),
        Option("layer", int, None, "transcoder layer L: reads ln2_out_L, predicts mlp_out_L", check=non_negative),
        Option("kind", str, SAEConfig.kind, "sae, or transcoder (MLP input to MLP output)", choices=KINDS),
        Option("expansion", int, 8, "latents per input dimension", check=positive),
        Option("l1", float, SAEConfig.l1, "L1 coefficient on the mean ||f||_1", check=non_negative),
        Option("steps", int, SAEConfig.steps, "Adam steps", check=positive),
        Option("lr", float, SAEConfig.lr, "Adam learning rate", check=positive),
        Option("batch_size", int, SAEConfig.batch_size, "rows per step", check=positive),
        Option("sae_seed", int, SAEConfig.seed, "seed of the initialisation and of the batch sampling"),
        Option("precision", str, SAEConfig.precision, "bf16: the training step under bf16 autocast, with fp32 "
               "weights, loss and evaluation; or fp32", choices=PRECISIONS),
        Option("eval_every", int, SAEConfig.eval_every, "steps between metric evaluations on the training data",
               check=positive),
        *batch_options(SAE_SPEC),
        *batch_options(EVAL_SPEC, prefix="heldout"),
        CHECKPOINT,
        THREADS,
    ),
    code_version="2",  # 2: --precision, bf16 autocast by default
)


FIT_ROTATION = Stage(
    "fit_rotation", "Fit, log and register the rotation between two seeds' residual streams at each site.",
    (
        Option("source", str, REQUIRED, "train_seed run ID of the source model (rotations map into its frame)",
               run_ids=True),
        Option("target", str, REQUIRED, "train_seed run ID of the target model", run_ids=True),
        Option("sites", str, None, "comma-separated residual-width sites; default: every residual site"),
        Option("alias", str, None, "registry alias of the pair; default s<source seed>-to-s<target seed>"),
        *batch_options(EVAL_SPEC),
    ),
    code_version="1",
)


AUDIT = Stage(
    "audit", "Audit how a seed's SAEs transfer to other seeds, raw and rotated, beside an untrained pair.",
    (
        Option("source", str, REQUIRED, "train_seed run ID of the source model", run_ids=True),
        Option("saes", str, REQUIRED, "comma-separated train_sae run IDs on the source model, one per site "
               "(a multi-site group run stands for its children)", run_ids=True),
        Option("targets", str, REQUIRED, "comma-separated train_seed run IDs of the target models", run_ids=True),
        Option("target_saes", str, None, "train_sae run IDs on target models (groups too), for decoder cosine",
               run_ids=True),
        Option("null", str, None, "'A,B': seeds of two untrained models audited beside the trained pairs"),
        Option("null_sae_steps", int, None, "steps of the untrained source's SAEs; default: the source SAE's",
               check=positive),
        Option("gaussian_seed", int, 7, "seed of the Gaussian baseline samples"),
        *batch_options(EVAL_SPEC),
        CHECKPOINT,
        Option("target_checkpoints", str, None, "comma-separated checkpoints of the targets to audit (final: the "
               "final weights), each against the source; default: --checkpoint"),
        Option("planted_nulls", bool, True, "also audit the source against itself: bf16-rounded, under a known Haar "
               "rotation and under a known small-angle one"),
        Option("power_draws", int, 0, "draws per departure of the rotation statistics' power curve on the source's "
               "activations at each internal site (0: none)", check=non_negative),
        THREADS,
    ),
    code_version="3",  # 3: the power curve has the Monte-Carlo KS p-values (ks_mc, det_ks_mc)
)


CONNECTIVITY = Stage(
    "connectivity", "Linear mode connectivity between seeds: loss along the straight line, unaligned and aligned.",
    (
        Option("reference", str, REQUIRED, "train_seed run ID of seed A: the others are aligned to it", run_ids=True),
        Option("models", str, REQUIRED, "comma-separated train_seed run IDs of the seeds B", run_ids=True),
        Option("points", int, 11, "evaluation points along each path, ends included (at least 11)", check=positive),
        Option("eval_sequences", int, 512, "held-out sequences per split the path is evaluated on", check=positive),
        Option("eval_seed", int, 777, "seed of the held-out sequences"),
        *ALIGNMENT_OPTIONS,
        CHECKPOINT,
        THREADS,
    ),
    code_version="2",
)


STEERING = Stage(
    "steering", "Build the toy steering vectors on a source seed and measure how they transfer, raw and rotated.",
    (
        Option("source", str, REQUIRED, "train_seed run ID whose activations define the steering vectors",
               run_ids=True),
        Option("targets", str, REQUIRED, "comma-separated train_seed run IDs the vectors are transferred to",
               run_ids=True),
        Option("site", str, "resid_mid_1", "residual site the vectors are built at and added to"),
        Option("alphas", str, STEERING_ALPHAS, "comma-separated positive doses alpha (alpha * vector is added)"),
        Option("use_registry", bool, False, "rotate with the registered rotation of each pair instead of fitting "
               "one on the batch"),
        Option("control_seed", int, 0, "seed of the random control directions"),
        Option("controls", int, 8, "random control directions per vector; a control's effect is their mean",
               check=positive),
        Option("sentences", str, None, "hf_activations runs: YAML of contrastive sentence sets; default "
               "projects/steering/pythia.yaml"),
        Option("eval_sequences", int, None, "hf_activations runs: sequences of the source's sample the effect is "
               f"measured on; default {HF_STEERING_SEQUENCES}", check=positive),
        *batch_options(EVAL_SPEC),
        THREADS,
    ),
    code_version="5",
)


BARS = Stage(
    "bars", "Score models on the paper's four bars, within seed and against an aligned reference.",
    (
        Option("reference", str, REQUIRED, "train_seed run ID of the primary seed: models are aligned to it and its "
               "IG predicts their effects", run_ids=True),
        Option("models", str, REQUIRED, "comma-separated train_seed run IDs to score (may include the reference)",
               run_ids=True),
        Option("samples", int, BARS_SAMPLES, "Bar B sequences per model (paper: 10^7)", check=positive),
        Option("ig_steps", int, IG_STEPS, "integrated-gradients path points", check=positive),
        Option("eval_sequences", int, task.C_EVAL.n_sequences, "sequences of each causal evaluation batch",
               check=positive),
        Option("means_sequences", int, None, "sequences of each component-means batch; default the paper's "
               "4096 (C), 2048 (Pr), 1024 (cross)", check=positive),
        *ALIGNMENT_OPTIONS,
        Option("lambdas", str, None, "comma-separated joint-loss weights to sweep (paper: 0,0.1,1,10,100)"),
        Option("null", str, None, "'A,B': seeds of two untrained models scored beside the trained ones on every "
               "bar but the joint sweep (the null control)"),
        Option("decoy", bool, False, "also score the reference's decoy (depth unembedding rows averaged in pairs)"),
        CHECKPOINT,
        THREADS,
    ),
    code_version="2",  # 2: Bar B, Bar C and Bar Pr over length-sorted chunks (equal up to float rounding)
)


LENSES = Stage(
    "lenses", "Lens 1 head norms, ACDC-style head pruning and lens 4 activation patterns per model.",
    (
        Option("models", str, REQUIRED, "comma-separated train_seed run IDs", run_ids=True),
        Option("acdc_threshold", float, ACDC_THRESHOLD, "effective ablation loss a head must exceed to be kept",
               check=non_negative),
        Option("lens4_sequences", int, task.LENS4_SPEC.n_sequences, "sequences whose positions lens 4 counts "
               "patterns on", check=positive),
        CHECKPOINT,
        THREADS,
    ),
    code_version="2",  # 2: ablation losses over length-sorted chunks (equal up to float rounding)
)


TRAIN_NEOX = Stage(
    "train_neox", "Train one tiny GPT-NeoX seed on a local corpus; store its revisions as a hub cache.",
    (
        Option("seed", int, REQUIRED, "torch seed of the initialisation and of the data order"),
        Option("repo_id", str, None, "hub name the seed is stored under; default polyrot/neox-tiny-seed<seed>"),
        Option("corpus", str, None, "local text file, one document per line; default: the stdlib's docstrings"),
        Option("d_model", int, NeoxRecipe.d_model, "residual width", check=positive),
        Option("n_layers", int, NeoxRecipe.n_layers, "blocks", check=positive),
        Option("n_heads", int, NeoxRecipe.n_heads, "attention heads per block", check=positive),
        Option("d_mlp", int, NeoxRecipe.d_mlp, "MLP width", check=positive),
        Option("vocab_size", int, NeoxRecipe.vocab_size, "BPE vocabulary size", check=positive),
        Option("seq_len", int, NeoxRecipe.seq_len, "training window (and context) length", check=positive),
        Option("batch_size", int, NeoxRecipe.batch_size, "windows per step", check=positive),
        Option("steps", int, NeoxRecipe.steps, "AdamW steps", check=positive),
        Option("lr", float, NeoxRecipe.lr, "peak learning rate", check=positive),
        Option("warmup", int, NeoxRecipe.warmup, "linear warmup steps", check=non_negative),
        Option("weight_decay", float, NeoxRecipe.weight_decay, "AdamW weight decay on matrices", check=non_negative),
        Option("checkpoint_steps", str, "0", "comma-separated steps stored as revisions step<N> (0: the initialisation)"),
        Option("cache_dir", str, None, "also write the revisions into this hub cache"),
        THREADS,
    ),
    code_version="1",
)


HF_ACTIVATIONS = Stage(
    "hf_activations", "Hidden states of a Hugging Face causal LM at residual sites on a seeded corpus sample.",
    (
        *HF_MODEL_OPTIONS,
        Option("sequences", int, 256, "sequences in the sample", check=positive),
        Option("tokens", int, 256, "tokens per sequence", check=positive),
        Option("corpus_seed", int, CORPUS_SEED, "seed of the document order"),
        Option("sites", str, None, "comma-separated sites; default every residual site"),
        Option("batch_size", int, 8, "sequences per forward pass", check=positive),
        Option("label", str, None, "short name of the model in tables and aliases; default from name and revision"),
        *HF_RUNTIME_OPTIONS,
    ),
    code_version="1",
)


HF_ATTRIBUTION = Stage(
    "hf_attribution", "Per block of a Hugging Face causal LM: mean-ablation effect against its AP and IG predictions.",
    (
        *HF_MODEL_OPTIONS,
        Option("sequences", int, 8, "sequences in the sample", check=positive),
        Option("tokens", int, 128, "tokens per sequence", check=positive),
        Option("corpus_seed", int, CORPUS_SEED, "seed of the document order"),
        Option("ig_steps", int, IG_STEPS, "integrated-gradients path points", check=positive),
        *HF_RUNTIME_OPTIONS,
    ),
    code_version="1",
)


REPRODUCE = Stage(
    "reproduce", "Run a whole experiment from projects/: reuse finished stages, run the rest.",
    (
        Option("name", str, "dyck3-cohort-a", "experiment definition in projects/ (file stem)", positional=True),
        Option("profile", str, "cpu", "parameter profile of the experiment: cpu or paper"),
        Option("jobs", int, 1, "independent stages to run at once (local executor), each on cores/N threads, a "
               "free slot taking the first ready stage in the file's order; a stage every other one waits on or "
               "feeds (Cohort A's seed 0) runs alone, on every core",
               check=positive),
        Option("executor", str, "local", "where each stage runs: a local process, or a Slurm job (sbatch)",
               choices=("local", "slurm")),
        Option("partition", str, None, "Slurm partition of the jobs [default: Slurm's default partition]"),
        Option("time", str, None, "Slurm time limit of every job (30, 02:00:00, 1-00:00:00) [default: the "
               "experiment's resources, else the partition's]"),
        Option("no_wait", bool, False, "submit the Slurm jobs and return; a later reproduce waits for them and "
               "continues the graph"),
    ),
    code_version="1",
    # The MLflow experiment defaults to the experiment definition's own name, not to "polyrot".
    common=(Option("experiment", str, None, "MLflow experiment to log the runs in [default: the definition's name]"),
            PARENT_RUN),
    module="polyrot.experiments.reproduce",
    experiment_default="polyrot.experiments.reproduce:default_experiment",
)

STAGES: dict[str, Stage] = {s.name: s for s in (
    TRAIN_SEED, IMPORT_SEED, ACTIVATIONS, TRAIN_SAE, FIT_ROTATION, AUDIT, STEERING, BARS, CONNECTIVITY, LENSES,
    TRAIN_NEOX, HF_ACTIVATIONS, HF_ATTRIBUTION, REPRODUCE,
)}
