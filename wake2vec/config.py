"""Typed, frozen configuration for wake2vec.

Two kinds of configuration live here:

* `ModelConfig` describes a Llama-family network (Llama, Mistral, Qwen2, Phi-3, Gemma 2). It is built from a HuggingFace
  `config.json` (`ModelConfig.from_hf_dict`) and written back by `to_hf_dict`, so a
  checkpoint's architecture has exactly one representation inside the library.
  Anything the Flax model does not implement is refused by field name at load time:
  a silently wrong model is worse than an error.
* `TrainConfig` holds every setting of a Phase 1 run. Its fields map one to one onto the
  absl flags of `experiments/train_p1.py` (see `wake2vec.flags`), and its defaults are the
  reference run's recipe (../shared/ORIGINAL.md), except `injection` (whole_word; the
  study's is --injection=reference, see BUILD.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

from wake2vec.errors import UserError


class UnsupportedConfigError(UserError, ValueError):
    """A checkpoint uses an architecture or feature the Flax model does not implement."""


class FlagError(UserError, ValueError):
    """A flag's value is out of range or names nothing; the message names the flag."""


_DTYPES = ("float32", "bfloat16", "float16")


def dtype_from_name(name: str):
    """Maps 'float32' / 'bfloat16' / 'float16' (or 'fp32', 'bf16', 'fp16') to a jnp dtype."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} (or fp32/bf16/fp16)")
    # Imported here: the launchers read this module for their flags, and --help should
    # not wait for JAX.
    import jax.numpy as jnp

    return getattr(jnp, key)


# The HF architectures wake2vec runs, by config.json `model_type`, with the class that
# transformers builds for each (written back into an exported config.json).
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
# The rotary scalings the model implements, per family (transformers' names).
_ROPE_TYPES = {
    "llama": ("default", "linear", "llama3"),
    "mistral": ("default",),
    "qwen2": ("default",),
    "phi3": ("default", "longrope"),
    "gemma2": ("default",),
}
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A non-default RoPE frequency rule, as transformers' `rope_parameters` describes it.

    * linear: every inverse frequency divided by `factor` (position interpolation).
    * llama3: Llama 3.1's rule: wavelengths longer than original/low_freq_factor divided by
      `factor`, shorter than original/high_freq_factor kept, a smooth blend between.
    * longrope (Phi-3.x; "su" in older configs): inverse frequencies divided per dimension
      by `short_factor`, or by `long_factor` once a pass reaches beyond
      `original_max_position_embeddings`; cos and sin multiplied by `cos_sin_scale`.

    The fields hold what config.json says (None where it is silent, written back so); the
    values transformers derives from them are `cos_sin_scale`.
    """

    rope_type: str
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    # longrope: attention_factor, or sqrt(1 + log(s) / log(original)) for the context
    # extension s (factor, else max_position_embeddings / original), as transformers derives it.
    cos_sin_scale: float = 1.0

    def to_hf_dict(self, rope_theta: float) -> dict:
        names = {
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "longrope": (
                "short_factor", "long_factor", "original_max_position_embeddings", "factor", "attention_factor"
            ),
        }[self.rope_type]
        out = {"rope_type": self.rope_type, "rope_theta": rope_theta}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder: Llama 2/3.x, Mistral, Qwen2, Phi-3 or Gemma 2.

    One network (wake2vec.model) runs all five; the fields below are the features that tell
    the families apart, set by `from_hf_dict` from a checkpoint's config.json. The defaults
    are plain Llama, so a config built by hand for tests and benchmarks is a Llama.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # Grouped-query attention: each KV head serves num_attention_heads // num_key_value_heads
    # query heads. Equal to num_attention_heads is plain multi-head attention.
    num_key_value_heads: int
    # None means hidden_size // num_attention_heads, as HF derives it.
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    # TinyLlama ships untied; the Phase 1 recipe ties (one unified matrix).
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    # Llama 3 instruct checkpoints list several end-of-turn ids; a tuple keeps them all.
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # The HF architecture (a key of ARCHITECTURES): which class an export is loaded as, and
    # which layout-only details apply (Phi-3's fused projections, Gemma 2's norms).
    model_type: str = "llama"
    rope_scaling: RopeScaling | None = None
    # MLP gate activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU).
    hidden_act: str = "silu"
    # Keys older than `sliding_window` positions are masked, in the layers listed as
    # sliding in `layer_types` (None: every layer slides when a window is set).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    # Gemma 2: scores are scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5,
    # and attention scores / final logits pass through cap * tanh(x / cap).
    query_pre_attn_scalar: int | float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.model_type not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"model_type={self.model_type!r} is not supported; wake2vec implements {sorted(ARCHITECTURES)}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise UnsupportedConfigError(
                f"layer_types lists {len(self.layer_types)} layers but num_hidden_layers={self.num_hidden_layers}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    # Family traits with no config.json field of their own: transformers hard-codes them per class.
    @property
    def qkv_bias(self) -> bool:
        """Qwen2 has biases on q/k/v (not o)."""
        return self.model_type == "qwen2"

    @property
    def gemma_norms(self) -> bool:
        """Gemma 2: RMSNorm scales by (1 + w), norms before and after attention and MLP,
        and the embedding output is multiplied by sqrt(hidden_size)."""
        return self.model_type == "gemma2"

    @property
    def fused_projections(self) -> bool:
        """Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj (layout only)."""
        return self.model_type == "phi3"

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer, the attention window in positions; 0 is full causal attention."""
        if not self.sliding_window:
            return (0,) * self.num_hidden_layers
        types = self.layer_types or (SLIDING_ATTENTION,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == SLIDING_ATTENTION else 0 for t in types)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id, in config order (empty when there is none)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def num_params(self) -> int:
        """Parameter count, the head counted once when tied."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = d * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_attention_heads + 2 * self.num_key_value_heads)
        layer = attn + 3 * d * f + (4 if self.gemma_norms else 2) * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a HF config dict, refusing by field what the model cannot run.

        `source` names the file in error messages so users know which checkpoint is at fault.
        """
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedConfigError(
                f"{source}: model_type={model_type!r} is not supported; wake2vec implements {sorted(ARCHITECTURES)}"
            )
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act not in _ACTIVATIONS or (act == "silu") == (model_type == "gemma2"):
            raise UnsupportedConfigError(
                f"{source}: hidden_act={act!r} is not supported for {model_type}; wake2vec runs "
                f"{'gelu_pytorch_tanh (GeGLU)' if model_type == 'gemma2' else 'silu (SwiGLU)'}"
            )
        for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
            if hf.get(flag):
                raise UnsupportedConfigError(f"{source}: {flag}=true is not supported for {model_type}")
        if hf.get("pretraining_tp", 1) not in (None, 1):
            raise UnsupportedConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
            raise UnsupportedConfigError(f"{source}: partial_rotary_factor != 1 (partial RoPE) is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise UnsupportedConfigError(f"{source}: missing required field(s) {missing}")
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos) or None
        window = _sliding_window(hf, model_type)
        layer_types = hf.get("layer_types")
        if model_type == "gemma2" and not layer_types:
            # Gemma2Config's default: even layers local, odd layers global.
            layers = int(hf["num_hidden_layers"])
            layer_types = [SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION for i in range(layers)]
        unknown = sorted(set(layer_types or ()) - {FULL_ATTENTION, SLIDING_ATTENTION})
        if unknown:
            raise UnsupportedConfigError(
                f"{source}: layer_types {unknown} are not supported; only {FULL_ATTENTION}/{SLIDING_ATTENTION}"
            )
        gemma = model_type == "gemma2"
        max_positions = int(hf.get("max_position_embeddings", 2048))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            # transformers <5 writes rope_theta (and rope_scaling) at the top level; 5.x nests them in rope_parameters.
            rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
            rope_scaling=_rope_scaling(hf, model_type, max_positions, source),
            hidden_act=act,
            sliding_window=window,
            layer_types=tuple(layer_types) if window and layer_types else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256) if gemma else None,
            attn_logit_softcapping=hf.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=hf.get("final_logit_softcapping") if gemma else None,
        )

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """The config.json that transformers loads to this architecture (its own class per family)."""
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.dim_per_head,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf_dict(self.rope_theta),
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "sliding_window": self.sliding_window,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        if self.model_type == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "phi3" and self.rope_scaling is not None:
            out["original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
        if self.gemma_norms:
            out.update(
                hidden_activation=self.hidden_act,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
            )
        return out


def _sliding_window(hf: Mapping[str, Any], model_type: str) -> int | None:
    """The attention window a config really applies, or None (full causal attention)."""
    if model_type == "llama":
        window = None  # Llama has no window; a stray field would be ignored by transformers too
    elif model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2Config drops the window unless use_sliding_window is set
    else:
        window = hf.get("sliding_window")
    return int(window) if window else None


def _rope_scaling(hf: Mapping[str, Any], model_type: str, max_positions: int, source: str) -> RopeScaling | None:
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "su":  # Phi-3's earlier name for longrope (Phi3Config renames it too)
        rope_type = "longrope"
    if rope_type not in _ROPE_TYPES[model_type]:
        raise UnsupportedConfigError(
            f"{source}: rope_scaling.rope_type={rope_type!r} is not supported for {model_type}; "
            f"wake2vec implements {list(_ROPE_TYPES[model_type])}"
        )
    original = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(original),
        )
    factor, attention = scaling.get("factor"), scaling.get("attention_factor")
    extension = float(factor or max_positions / int(original))
    scale = attention
    if scale is None:
        scale = math.sqrt(1 + math.log(extension) / math.log(int(original))) if extension > 1 else 1.0
    return RopeScaling(
        "longrope",
        factor=None if factor is None else float(factor),
        original_max_position_embeddings=int(original),
        short_factor=tuple(float(x) for x in scaling["short_factor"]),
        long_factor=tuple(float(x) for x in scaling["long_factor"]),
        attention_factor=None if attention is None else float(attention),
        cos_sin_scale=float(scale),
    )


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
    # Storage of the frozen transformer weights: float32 | bfloat16 | float16, or weight-only int8 | nf4 (wake2vec.quant).
    frozen_dtype: str = "float32"
    # Matmul compute dtype; norms, softmax and the loss always accumulate in float32.
    compute_dtype: str = "float32"
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
    the language-model loss plus the study's four alignment terms (wake2vec.alignment), on
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
