"""Typed, frozen configuration for wake2vec.

Two kinds of configuration live here:

* `ModelConfig` describes a Llama-family network. It is built from a HuggingFace
  `config.json` (`ModelConfig.from_hf_dict`) and written back by `to_hf_dict`, so a
  checkpoint's architecture has exactly one representation inside the library.
  Anything the Flax model does not implement is refused by field name at load time:
  a silently wrong model is worse than an error.
* `TrainConfig` holds every setting of a Phase 1 run. Its fields map one to one onto the
  absl flags of `experiments/train_p1.py` (see `wake2vec.flags`), and its defaults are the
  reference run's recipe (../shared/ORIGINAL.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from wake2vec.errors import UserError


class UnsupportedConfigError(UserError, ValueError):
    """A checkpoint uses a feature the Flax Llama does not implement."""


_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def dtype_from_name(name: str):
    """Maps 'float32' / 'bfloat16' / 'float16' (or 'fp32', 'bf16', 'fp16') to a jnp dtype."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = aliases.get(name, name)
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} (or fp32/bf16/fp16)")
    return _DTYPES[key]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (the subset TinyLlama-1.1B uses)."""

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
    eos_token_id: int | None = 2

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_params(self) -> int:
        """Parameter count, the head counted once when tied."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.dim_per_head
        attn = d * hd * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a HF Llama config dict, refusing what the model cannot run.

        `source` names the file in error messages so users know which checkpoint is at fault.
        """
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise UnsupportedConfigError(
                f"{source}: model_type={model_type!r} is not supported; wake2vec implements 'llama' only"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"{source}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU)")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise UnsupportedConfigError(f"{source}: {flag}=true is not supported; Llama projections have no bias")
        if hf.get("sliding_window") not in (None, 0):
            raise UnsupportedConfigError(
                f"{source}: sliding_window={hf['sliding_window']} is not supported; attention is full causal"
            )
        if hf.get("pretraining_tp", 1) not in (None, 1):
            raise UnsupportedConfigError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported")
        # transformers <5 writes rope_theta and rope_scaling at the top level; 5.x nests both
        # in rope_parameters. Either way anything but the default rotation is refused.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        for key in ("rope_scaling", "rope_parameters"):
            scaling = hf.get(key)
            if scaling:
                rope_type = scaling.get("rope_type", scaling.get("type", "default"))
                if rope_type != "default":
                    raise UnsupportedConfigError(
                        f"{source}: {key}.rope_type={rope_type!r} is not supported; only the default RoPE"
                    )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in hf]
        if missing:
            raise UnsupportedConfigError(f"{source}: missing required field(s) {missing}")
        heads = int(hf["num_attention_heads"])
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            rope_theta=float(rope_theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos,
        )

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """The config.json that transformers' LlamaForCausalLM loads to this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
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
            "rope_scaling": None,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": torch_dtype,
            "use_cache": True,
        }


# The model source that selects the embedded demo: a seeded random Llama, a tokenizer trained
# on the bundled sample text and a lexicon built from it (wake2vec.demo).
DEMO_SOURCE = "demo"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a Phase 1 run; one field per flag of experiments/train_p1.py.

    Defaults reproduce the reference run (../shared/ORIGINAL.md): TinyLlama's recipe of
    256-token blocks, 1 x 16 accumulation, Adafactor at 5e-4, 3,000 steps, tied table,
    all rows training. `model="demo"` runs the embedded demo instead of a real checkpoint.
    """

    # Run directory: config, tokenizer, checkpoints, metrics, analysis all go here.
    workdir: str = "runs/demo"
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
    # Blocks per microbatch (split over the mesh's 'data' axis).
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
    # Keep the base vocabulary's rows exactly fixed (the reference run left this off).
    mask_base_rows: bool = False
    # One unified matrix for input embedding and LM head (the reference); False keeps the head and trains both.
    tie_embeddings: bool = True
    # New-row initialiser: mean_noise | spherical | subword_mean | hewitt.
    init: str = "mean_noise"
    # mean_noise: noise scale in units of the base per-dimension std.
    init_noise_scale: float = 0.1
    # spherical: radius in units of the base radius (std x sqrt(dim)).
    init_sphere_factor: float = 1.5
    # hewitt: covariance scale eps.
    init_hewitt_eps: float = 1e-5
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
    # Seeds the new-row init and the batch order; every key is fold_in(seed, step).
    seed: int = 0
    # Device mesh 'data,model', e.g. "8,1" or "4,2"; empty: all devices on 'data'.
    mesh: str = ""
    # Call jax.distributed.initialize() (multi-host GPU / TPU pod).
    distributed: bool = False
    # Storage dtype of the frozen transformer weights: float32 | bfloat16 | float16.
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
