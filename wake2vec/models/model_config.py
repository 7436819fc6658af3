"""What a Llama-family network is: `ModelConfig`, built from a HuggingFace config.json.

`ModelConfig` describes a Llama-family network (Llama, Mistral, Qwen2, Phi-3, Gemma 2). It
is built from a HuggingFace `config.json` (`ModelConfig.from_hf_dict`) and written back by
`to_hf_dict`, so a checkpoint's architecture has exactly one representation inside the
library. Anything the Flax model does not implement is refused by field name at load time:
a silently wrong model is worse than an error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from wake2vec.errors import UserError


class UnsupportedConfigError(UserError, ValueError):
    """A checkpoint uses an architecture or feature the Flax model does not implement."""


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

    One network (wake2vec.models.model) runs all five; the fields below are the features that tell
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
