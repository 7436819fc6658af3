"""GGUF files (llama.cpp's format) as a model source: config, weights and tokenizer, no torch.

A `.gguf` file holds everything a HF checkpoint directory does, in one file: the
architecture as metadata keys (`llama.block_count`, ...), the weights as (possibly
quantized) tensors under llama.cpp's names, and the tokenizer as its vocabulary, merges and
token types. This module turns each into what wake2vec already uses, so the rest of the
library treats a GGUF file like a HF directory (convert.load_hf dispatches here):

* `read_config`: a HF-style config dict built from the metadata and passed through
  `ModelConfig.from_hf_dict`, so GGUF and config.json are refused by the same rules.
  Features llama.cpp encodes that the Flax Llama lacks (partial rotary, rope scaling,
  experts) are refused by key.
* `iter_tensors`: each tensor dequantized to float32 with the `gguf` package's numpy
  kernels, renamed to HF's names, in HF's (out, in) layout. llama.cpp's converter permutes
  the rows of q and k from HF's rotate-half order (the two halves of each head) to
  interleaved pairs, the order its RoPE kernel rotates; that permutation is undone here
  (transformers' GGUF loader undoes it the same way), because wake2vec's RoPE is
  rotate-half like HF's.
* `load_tokenizer`: a transformers fast tokenizer rebuilt from the metadata (byte-level
  BPE only), with the pre-tokenizer the file's `tokenizer.ggml.pre` names.

Only quant types that are exercised by the tests are accepted (`SUPPORTED_TYPES`); any other
is refused by name rather than trusted to a kernel nobody here has checked.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Iterator

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from wake2vec.config import ModelConfig
from wake2vec.errors import UserError

SUFFIX = ".gguf"

# Float types and the block quantizations whose dequantization the tests compare with
# transformers' own (tests/test_gguf.py writes one file per type).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}

# tokenizer.ggml.pre -> the pre-tokenizer its merges were learned under. "smollm" is
# llama.cpp's name for SmolLM's split: every digit alone, then GPT-2's regex.
_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types


class GGUFFormatError(UserError, ValueError):
    """A .gguf file is missing, unreadable or inconsistent."""


class UnsupportedGGUFError(GGUFFormatError):
    """A .gguf file uses an architecture, quant type or tokenizer wake2vec does not implement."""


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(SUFFIX)


@functools.lru_cache(maxsize=4)
def _reader(path: str):
    """The memory-mapped reader (cached: config, weights and tokenizer read the same file)."""
    import gguf

    if not os.path.isfile(path):
        raise GGUFFormatError(f"{path}: no such GGUF file; pass --model=PATH to an existing .gguf file")
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise GGUFFormatError(f"{path}: not a readable GGUF file ({e})") from e


@functools.lru_cache(maxsize=4)
def _metadata(path: str) -> dict:
    """Every metadata key -> its value (strings, numbers or lists); cached, as decoding the
    49,152-token vocabulary takes about a second and config, weights and tokenizer all read it."""
    return {name: field.contents() for name, field in _reader(str(path)).fields.items()}


def source_hash(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes: the value PROVENANCE.md and model hubs publish."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hf_config_dict(path: str | os.PathLike) -> dict:
    """The metadata as the HF config.json of the same model."""
    meta = _metadata(str(path))
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UnsupportedGGUFError(
            f"{path}: general.architecture={arch!r} is not supported; wake2vec reads Llama-architecture GGUF files only"
        )

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    if heads is None or hidden is None:
        raise GGUFFormatError(f"{path}: {arch}.attention.head_count or {arch}.embedding_length is missing")
    head_dim = key("attention.key_length", hidden // heads)
    refusals = {
        "rope.dimension_count": (key("rope.dimension_count", head_dim), head_dim, "partial rotary embeddings"),
        "attention.value_length": (key("attention.value_length", head_dim), head_dim, "value heads of another size"),
        "rope.scaling.type": (key("rope.scaling.type", "none"), "none", "rope scaling"),
        "expert_count": (key("expert_count", 0), 0, "mixture of experts"),
    }
    for name, (value, allowed, feature) in refusals.items():
        if value != allowed:
            raise UnsupportedGGUFError(
                f"{path}: {arch}.{name}={value!r} ({feature}) is not supported; wake2vec's Llama needs {allowed!r}"
            )
    tensor_names = {t.name for t in _reader(str(path)).tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    return {
        "model_type": arch,
        "vocab_size": key("vocab_size", len(tokens) if tokens else None),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rope_theta": key("rope.freq_base", 10000.0),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5),
        "max_position_embeddings": key("context_length", 2048),
        # llama.cpp writes no output.weight when the head is the input table.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The model's config, once every tensor is known to be readable: a run reads the config
    first and writes its token cache and tokenizer next, so a file it cannot dequantize is
    refused here, before anything lands in the workdir."""
    for tensor in _reader(str(path)).tensors:
        _checked_name(tensor, path)
    hf = {k: v for k, v in hf_config_dict(path).items() if v is not None or k.endswith("token_id")}
    return ModelConfig.from_hf_dict(hf, source=str(path))


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved-pair row order of a q/k projection -> HF's rotate-half order.

    Per head, llama.cpp stores rows (0, d/2, 1, d/2+1, ...) of HF's head; reading them as
    (d/2, 2) and swapping the axes puts each half back together.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(name: str, path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)  # blk.{i}.{suffix}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    raise UnsupportedGGUFError(f"{path}: tensor {name!r} has no counterpart in wake2vec's Llama")


def _checked_name(tensor, path) -> str:
    """The tensor's HF name, refusing a tensor with no counterpart or a quant type not dequantized here."""
    hf_name = _hf_name(tensor.name, path)
    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedGGUFError(
            f"{path}: tensor {tensor.name!r} is stored as {qtype}, which wake2vec does not dequantize; "
            f"supported: {', '.join(SUPPORTED_TYPES)} (re-quantize the model to one of them)"
        )
    return hf_name


def iter_tensors(path: str | os.PathLike, names: frozenset[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array in HF's layout), one tensor at a time; with `names`, only
    those tensors (the others are never dequantized)."""
    from gguf import quants

    cfg = read_config(path)
    for tensor in _reader(str(path)).tensors:
        hf_name = _checked_name(tensor, path)
        if names is not None and hf_name not in names:
            continue
        # GGUF lists dimensions fastest-first; numpy's (out, in) is the reverse.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        weight = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
        if hf_name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, cfg.num_key_value_heads)
        yield hf_name, weight


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The file's byte-level BPE tokenizer as a transformers fast tokenizer.

    Control tokens (type 3) become special tokens and user-defined ones (type 4) added
    tokens, as llama.cpp matches both whole. No BOS is prepended unless the file says
    `tokenizer.ggml.add_bos_token` (SmolLM2's says false).
    """
    meta = _metadata(str(path))
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UnsupportedGGUFError(
            f"{path}: tokenizer.ggml.model={kind!r} is not supported; wake2vec rebuilds byte-level BPE ('gpt2') "
            "tokenizers only. Pass --tokenizer=DIR holding the model's tokenizer.json instead"
        )
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedGGUFError(
            f"{path}: tokenizer.ggml.pre={pre!r} is not supported (known: {', '.join(_PRE_TOKENIZERS)}); "
            "pass --tokenizer=DIR holding the model's tokenizer.json instead"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFFormatError(f"{path}: the tokenizer's tokens and merges are inconsistent (duplicate tokens?)")

    def token(key):
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    if meta.get("tokenizer.ggml.add_bos_token") and token("bos_token_id") is not None:
        bos = token("bos_token_id")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokens.index(bos))])

    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=token("bos_token_id"), eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
        model_max_length=context or int(1e30), clean_up_tokenization_spaces=False,
    )
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    return tokenizer
