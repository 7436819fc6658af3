"""Typed, frozen configuration of the training phases (wake2vec.models.model_config describes the network).

`TrainConfig` holds every setting of a Phase 1 run, `Phase2Config` and `Phase3Config` those
of the later phases; `RunConfig` is what they share. Their fields map one to one onto the
absl flags of the launchers in experiments/ (see `wake2vec.flags`), and their defaults are
the reference run's recipe, except `injection` (whole_word; the study's is
--injection=reference, see docs/injection_modes.md).

`ModelConfig`, `RopeScaling`, `UnsupportedConfigError` and `dtype_from_name` are re-exported
from wake2vec.models.model_config, so `from wake2vec.config import ModelConfig` keeps working.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from wake2vec.errors import UserError
from wake2vec.models.model_config import (  # noqa: F401 (re-exported)
    ARCHITECTURES, ModelConfig, RopeScaling, UnsupportedConfigError, dtype_from_name)


class FlagError(UserError, ValueError):
    """A flag's value is out of range or names nothing; the message names the flag."""


# The model source that selects the embedded demo: a seeded random Llama, a tokenizer trained
# on the bundled sample text and a lexicon built from it (wake2vec.demo).
DEMO_SOURCE = "demo"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The settings every training phase shares: the loop, the optimiser, the mesh, the dtypes.

    Each phase's config (TrainConfig for Phase 1, Phase2Config, Phase3Config) adds its own
    fields and may redeclare a default here (a redeclared field keeps its place). Defaults
    are Phase 1's recipe.
    """

    # Fields holding paths: the launcher expands their `~`.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir",)
    # Whether the optimiser keeps the table's base rows exactly fixed: Phase 1 makes it a
    # flag (a field of the same name), Phase 3 always does, Phase 2 trains no row.
    mask_base_rows: ClassVar[bool] = False

    # Run directory: config, tokenizer, checkpoints, metrics, analysis all go here.
    workdir: str = "runs/demo"
    # Blocks per microbatch (split over every device; a multiple of the device count).
    batch_size: int = 1
    # Microbatches accumulated per optimizer step (scanned inside the jitted step).
    grad_accum: int = 16
    # Optimizer steps; 0 prepares the workdir (vocab, init, data, snapshot, config.json) and exits.
    max_steps: int = 3000
    # Peak learning rate.
    lr: float = 5e-4
    # Linear warmup over this fraction of max_steps, then `schedule`.
    warmup_ratio: float = 0.05
    # After warmup: cosine | linear | constant.
    schedule: str = "cosine"
    # adafactor (the reference; HF's factored second moment) | adamw.
    optimizer: str = "adafactor"
    # Decoupled weight decay on the trainable rows (applied before the row mask).
    weight_decay: float = 0.0
    # Global-norm gradient clip; 0 disables.
    clip_norm: float = 1.0
    # Validation loss every N steps (and at the last step).
    eval_every: int = 100
    # Checkpoint every N steps (and at the last step).
    save_every: int = 100
    # Log the mean training loss, lr and tokens/s every N steps (and at every save).
    log_every: int = 10
    # Checkpoints kept (max_to_keep); the best by validation loss is kept besides.
    keep: int = 3
    # Save the table alone as npy every N steps for trajectory analysis; 0 disables.
    snapshot_every: int = 0
    # Stop after this many evaluations without a new lowest validation loss (the LM loss alone); 0 never stops early. The count resumes from metrics.jsonl.
    early_stop_patience: int = 0
    # Seeds the new-row init and the batch order; every key is fold_in(seed, step).
    seed: int = 0
    # Device mesh 'data,model', e.g. "1,8" or "2,4": the table is split over 'model', the batch and body over all; empty: all on 'model'.
    mesh: str = ""
    # Call jax.distributed.initialize() (multi-host GPU / TPU pod).
    distributed: bool = False
    # With --distributed: the coordinator (process 0) as host:port; empty lets JAX detect the cluster.
    coordinator_address: str = ""
    # With --coordinator_address: how many processes the run has.
    num_processes: int = 0
    # With --coordinator_address: this process's index, 0 to num_processes - 1; process 0 writes the workdir.
    process_id: int = -1
    # With --distributed: seconds to wait for every process to reach the coordinator before giving up with a message.
    coordinator_timeout_s: int = 300
    # With --distributed: seconds without a heartbeat after which a lost process is declared dead and the run stops.
    heartbeat_timeout_s: int = 60
    # Storage of the frozen transformer weights: float32 | bfloat16 | float16, or weight-only int8 | nf4 (wake2vec.models.quant).
    frozen_dtype: str = "float32"
    # Matmul compute dtype; norms, softmax and the loss always accumulate in float32.
    compute_dtype: str = "float32"
    # With --compute_dtype=float16: dynamic (scale the loss, skip and halve on overflow; wake2vec.training.loss_scale) | none. Ignored otherwise.
    loss_scale: str = "dynamic"
    # Float32 matmul precision: auto (highest for float32 compute, XLA's default otherwise) | default | high | highest; env WAKE2VEC_MATMUL_PRECISION overrides; config.json records the effective one.
    matmul_precision: str = "auto"
    # Rematerialisation: none | full | dots (save matmul outputs, recompute the rest).
    remat: str = "full"
    # Tokens per chunk of the chunked cross-entropy.
    loss_chunk: int = 1024
    # Validation blocks per eval; 0 means all of them.
    eval_blocks: int = 0
    # Run the embedding analysis at the end of training.
    analyze: bool = True
    # Write a few greedy/sampled continuations at the end of training (demo default on).
    generate_at_end: bool = False
    # Accept a config that differs from the one stored in an existing workdir.
    allow_config_change: bool = False
    # What a changed --max_steps does to the lr schedule of an existing run: restart (the added steps get their own warmup and decay) | stretch (the schedule recomputed for the new --max_steps, the lr jumps); required then.
    extend_schedule: str = ""


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Every setting of a Phase 1 run; one field per flag of experiments/train_p1.py.

    Defaults reproduce the reference run (../shared/ORIGINAL.md): TinyLlama's recipe of
    256-token blocks, 1 x 16 accumulation, Adafactor at 5e-4, 3,000 steps, tied table,
    all rows training. `model="demo"` runs the embedded demo instead of a real checkpoint.
    The loop's settings are RunConfig's.
    """

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "model", "tokenizer", "corpus", "lexicon")

    # HF hub id, local checkpoint dir or Llama .gguf file; "demo" builds a seeded random Llama in the workdir.
    model: str = DEMO_SOURCE
    # Tokenizer dir or tokenizer.json; empty means the one beside the model (a .gguf file: its own).
    tokenizer: str = ""
    # UTF-8 training text; empty means the bundled sample (demo only).
    corpus: str = ""
    # One word per line; empty means build one from the corpus (demo only).
    lexicon: str = ""
    # Strip Gutenberg-style *** START/END *** banners before tokenizing.
    strip_banners: bool = True
    # Start the corpus at the first occurrence of this text (the reference used "riverrun"); empty: no anchor.
    start_marker: str = ""
    # Tokens per block (non-overlapping).
    seq_len: int = 256
    # Fraction of blocks (the last ones) held out for validation.
    val_fraction: float = 0.1
    # Shuffle blocks with this seed before the split; negative keeps text order (the reference).
    split_shuffle_seed: int = -1
    # Keep the base vocabulary's rows exactly fixed (the reference run left this off).
    mask_base_rows: bool = False
    # One unified matrix for input embedding and LM head (the reference); False keeps the head and trains both.
    tie_embeddings: bool = True
    # Lexicon injection: whole_word (a new token only for a whole word; every other word keeps
    # the base segmentation) | reference (the study's add_tokens, which also matches inside words).
    injection: str = "whole_word"
    # New-row initialiser: mean_noise | spherical | subword_mean | hewitt | distill (docs/distill.md).
    init: str = "mean_noise"
    # mean_noise: noise scale in units of the base per-dimension std.
    init_noise_scale: float = 0.1
    # spherical: radius in units of the base radius (std x sqrt(dim)).
    init_sphere_factor: float = 1.5
    # hewitt: covariance scale eps.
    init_hewitt_eps: float = 1e-5
    # distill: decoder layer whose output the new token must reproduce (negative counts from the last).
    distill_layer: int = -1
    # distill: training-text contexts per new row (a fixed generic sentence for words with none).
    distill_contexts: int = 4
    # distill: Adam steps per row, starting from subword_mean.
    distill_steps: int = 30
    # distill: Adam learning rate in units of the base table's entry std.
    distill_lr: float = 0.01
    # distill: new rows optimised together in one jitted step (memory vs speed; no effect on the rows).
    distill_batch: int = 32
    # distill: the new rows' output side: input (the distilled row; the only one when tied) | subword_mean |
    # first_piece (untied heads: the spelling's head rows) | joint (adds the next-token loss of the new token).
    distill_output: str = "input"


@dataclasses.dataclass(frozen=True)
class AdapterRecipe(RunConfig):
    """The study's defaults for the phases that train LoRA adapters (its Llama-3.2-1B script,
    shared by the other bases): TinyLlama's 8 blocks x 2 accumulation, AdamW at 2e-5,
    cosine after 10% warmup, weight decay 0.01, a bf16 body and bf16 compute. A redeclared
    field without a comment of its own keeps RunConfig's help."""

    batch_size: int = 8
    grad_accum: int = 2
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    # adamw (the study's Phases 2 and 3) | adafactor.
    optimizer: str = "adamw"
    # Decoupled weight decay on the adapters.
    weight_decay: float = 0.01
    frozen_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"


@dataclasses.dataclass(frozen=True)
class Phase2Config(AdapterRecipe):
    """Every setting of a Phase 2 run; one field per flag of experiments/train_p2.py.

    Phase 2 adapts the frozen body with LoRA over the frozen table of a Phase 1 run, on that
    run's own train/validation blocks. Defaults are the study's recipe (its Llama-3.2-1B
    script, which the other bases share): LoRA r 8, alpha 16, dropout 0.1 on q/k/v and the
    MLP projections, AdamW 2e-5, cosine after 10% warmup, weight decay 0.01, clip 1.0, bf16,
    TinyLlama's 8 blocks x 2 accumulation. A Phase 1 demo run gets a short demo schedule.
    """

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "phase1")

    # Run directory of this Phase 2 run (config, checkpoints of the adapters, metrics, analysis).
    workdir: str = "runs/demo_p2"
    # The Phase 1 workdir to adapt: its tokenizer, trained table, exact train/validation split and model source.
    phase1: str = "runs/demo"
    # Which Phase 1 checkpoint's table: best (lowest validation loss, the study's choice) | latest | a step number.
    phase1_step: str = "best"
    # Projections that get adapters, comma-separated (the study's six; o_proj is left out).
    lora_targets: str = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"
    # Adapter rank r.
    lora_rank: int = 8
    # Adapter scale alpha: the update is (alpha / r) x A B, PEFT's scaling.
    lora_alpha: float = 16.0
    # Dropout on the adapters' input while training; its mask is drawn from fold_in(seed, step).
    lora_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class Phase3Config(AdapterRecipe):
    """Every setting of a Phase 3 run; one field per flag of experiments/train_p3.py.

    Phase 3 trains a Phase 2 run's adapters together with the Wake rows of its table under
    the language-model loss plus the study's four alignment terms (wake2vec.phases.alignment), on
    Phase 1's own blocks. The base rows stay exactly fixed. Defaults are the study's
    TinyLlama recipe except the Wake rows' rate, which is Phase 1's (the study's was 10x
    below it, one of its defects), and early stopping, which survives a resume.
    """

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "phase2", "morpheme_groups", "device_groups")
    mask_base_rows: ClassVar[bool] = True

    # Run directory of this Phase 3 run.
    workdir: str = "runs/demo_p3"
    # The Phase 2 workdir to continue: its adapters, and through it Phase 1's table, tokenizer and split.
    phase2: str = "runs/demo_p2"
    # Which Phase 2 checkpoint's adapters: best (lowest validation loss) | latest | a step number.
    phase2_step: str = "best"
    # Morpheme groups, one JSON object per line (docs/groups.md); empty builds affix groups from the lexicon and the base vocabulary.
    morpheme_groups: str = ""
    # Device groups, one JSON object per line (docs/groups.md); empty leaves the device term out (its weight must then be 0).
    device_groups: str = ""
    # Groups with fewer pairs than this are dropped (the study: 3).
    min_group_pairs: int = 3
    # Weight of L_morph, the spread of a group's offsets v(word) - v(base) (the study: 0.1 on TinyLlama, 50 later).
    lambda_morph: float = 0.1
    # Weight of L_device, the device-group triplet margin (the study: 0.05 on TinyLlama, 2 later).
    lambda_device: float = 0.05
    # Weight of L_rep, the repulsion of near-identical Wake rows.
    lambda_rep: float = 0.05
    # Weight of L_norm, which keeps Wake row norms inside the base rows' band.
    lambda_norm: float = 0.01
    # Peak learning rate of the Wake rows (the adapters take --lr); Phase 1's rate by default.
    wake_lr: float = 5e-4
    # Decoupled weight decay on the adapters and the Wake rows (never on the base rows: they are masked after it).
    weight_decay: float = 0.01
    early_stop_patience: int = 3
