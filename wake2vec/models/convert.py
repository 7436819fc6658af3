"""HF checkpoints (Llama, Mistral, Qwen2, Phi-3, Gemma 2) <-> wake2vec parameters, without torch.

`load_hf` reads config.json and the weights (safetensors, single or sharded with an index,
or pytorch_model.bin through `torch.load(weights_only=True)`), checks every tensor's name
and shape against the config, and writes each one straight into its slot of the stacked
Flax layout (layer axis first, kernels transposed to (in, out)). Tensors are read one at a
time into preallocated stacked arrays, so peak host memory is the converted weights plus
the largest single tensor, not two copies of the model.

`save_hf` is the inverse: it streams the tensors back in HF's names and (out, in) layout
into model.safetensors, beside a config.json that transformers loads unchanged.

Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`; the Flax model
keeps them apart (one attention for every family), so a fused tensor fills several Flax
slots, split by rows in order, and is concatenated back on save.

safetensors files go through wake2vec.models.safetensors_codec (why not the `safetensors`
package: there).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from wake2vec.models import gguf_model
from wake2vec.models import padding
from wake2vec.config import ModelConfig
from wake2vec.models.safetensors_codec import (  # noqa: F401 (re-exported: convert.write_safetensors)
    CheckpointFormatError, iter_tensors, write_safetensors)

Params = dict[str, Any]


# Buffers some older exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- locating a checkpoint


def resolve_checkpoint(path_or_hub_id: str) -> pathlib.Path:
    """A local directory or .gguf file, or a hub id resolved (downloaded) through huggingface_hub."""
    path = pathlib.Path(path_or_hub_id).expanduser()
    if path.is_dir() or gguf_model.is_gguf(path):
        return path
    looks_like_hub_id = path_or_hub_id.count("/") == 1 and not path_or_hub_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointFormatError(f"{path_or_hub_id}: no such checkpoint directory")
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointFormatError(
            f"{path_or_hub_id} is not a local directory, and huggingface_hub is not installed to fetch it "
            "from the hub; install it or pass a local checkpoint directory"
        ) from e
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        local = pathlib.Path(huggingface_hub.snapshot_download(path_or_hub_id, allow_patterns=patterns))
        if not any(local.glob("*.safetensors")):
            local = pathlib.Path(huggingface_hub.snapshot_download(path_or_hub_id, allow_patterns=patterns + ["*.bin"]))
    except Exception as e:  # the hub client raises many types; all mean "could not fetch"
        raise CheckpointFormatError(
            f"could not fetch {path_or_hub_id!r} from the hub ({type(e).__name__}: {e}); "
            "check the id and your network, or download it and pass the local directory"
        ) from e
    return local


def weight_files(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files, safetensors preferred, in a stable order."""
    if gguf_model.is_gguf(ckpt_dir):
        return [ckpt_dir]
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = ckpt_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointFormatError(f"{index}: not a valid weight index ({e})") from e
            files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointFormatError(f"{index} lists weight files that are missing: {missing}")
            return files
        if (ckpt_dir / single).is_file():
            return [ckpt_dir / single]
    raise CheckpointFormatError(
        f"{ckpt_dir}: no weight file found (expected model.safetensors, pytorch_model.bin, or a sharded index)"
    )


def source_files(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """The files that make a model source: config.json and the weights, or the one .gguf file."""
    if gguf_model.is_gguf(ckpt_dir):
        return [ckpt_dir]
    return [ckpt_dir / "config.json", *weight_files(ckpt_dir)]


def source_hash(ckpt_dir: pathlib.Path) -> str:
    """sha256 over the config and weight files' names and bytes: identifies a frozen body."""
    if gguf_model.is_gguf(ckpt_dir):
        return gguf_model.source_hash(ckpt_dir)
    digest = hashlib.sha256()
    for f in source_files(ckpt_dir):
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_config(ckpt_dir: pathlib.Path) -> ModelConfig:
    if gguf_model.is_gguf(ckpt_dir):
        return gguf_model.read_config(ckpt_dir)
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        ggufs = sorted(ckpt_dir.glob("*.gguf")) if ckpt_dir.is_dir() else []
        if ggufs:  # a folder of downloaded .gguf files: the model is the file, not the folder
            raise CheckpointFormatError(f"{ckpt_dir} holds no config.json but {ggufs[0].name}; pass the file itself, "
                                        f"--model={ggufs[0]}")
        raise CheckpointFormatError(f"{ckpt_dir}: config.json is missing; a HF checkpoint directory needs one")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_path}: invalid JSON ({e})") from e
    return ModelConfig.from_hf_dict(hf, source=str(config_path))


def _iter_tensors(files: list[pathlib.Path], names: frozenset[str] | None = None) -> Iterator[tuple[pathlib.Path, str, np.ndarray]]:
    for path in files:
        if gguf_model.is_gguf(path):
            yield from ((path, name, arr) for name, arr in gguf_model.iter_tensors(path, names))
            continue
        if path.suffix == ".safetensors":
            for name, arr in iter_tensors(path, names):
                yield path, name, arr
            continue
        import torch  # only .bin checkpoints need torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            if names is not None and name not in names:
                continue  # mmap: an unread tensor's bytes stay on disk
            if tensor.dtype == torch.bfloat16:
                arr = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                arr = tensor.numpy()
            yield path, name, arr
        del state


# --------------------------------------------------------------------------- load / save


LayerPath = tuple[str, ...]


def _flax_layer_shapes(cfg: ModelConfig) -> dict[LayerPath, tuple[int, ...]]:
    """Each per-layer Flax leaf (without the layer axis) the config's family has."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.dim_per_head, cfg.num_key_value_heads * cfg.dim_per_head
    shapes: dict[LayerPath, tuple[int, ...]] = {
        ("self_attn", "q_proj", "kernel"): (d, q),
        ("self_attn", "k_proj", "kernel"): (d, kv),
        ("self_attn", "v_proj", "kernel"): (d, kv),
        ("self_attn", "o_proj", "kernel"): (q, d),
        ("mlp", "gate_proj", "kernel"): (d, f),
        ("mlp", "up_proj", "kernel"): (d, f),
        ("mlp", "down_proj", "kernel"): (f, d),
        ("input_layernorm", "scale"): (d,),
        ("post_attention_layernorm", "scale"): (d,),
    }
    if cfg.qkv_bias:
        sizes = (("q_proj", q), ("k_proj", kv), ("v_proj", kv))
        shapes.update({("self_attn", name, "bias"): (n,) for name, n in sizes})
    if cfg.gemma_norms:
        shapes.update({(name, "scale"): (d,) for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm")})
    return shapes


def _layer_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[LayerPath, ...], bool]]:
    """Per-layer HF tensor suffix -> (the Flax leaves it fills, in row order; transpose?).

    A kernel is HF's (out, in) weight transposed; a fused HF tensor's rows are its leaves'
    outputs one after another.
    """
    tensors = {}
    for path in _flax_layer_shapes(cfg):
        *module, leaf = path
        tensors[".".join(module) + (".bias" if leaf == "bias" else ".weight")] = ((path,), leaf == "kernel")
    if cfg.fused_projections:
        fusions = (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp.gate_up_proj", ("gate_proj", "up_proj")))
        for fused, parts in fusions:
            module = fused.split(".")[0]
            for part in parts:
                del tensors[f"{module}.{part}.weight"]
            tensors[f"{fused}.weight"] = (tuple((module, part, "kernel") for part in parts), True)
    return tensors


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    flax_shapes = _flax_layer_shapes(cfg)
    per_layer = {}
    for suffix, (paths, transpose) in _layer_tensors(cfg).items():
        rows = sum(flax_shapes[path][-1] for path in paths)
        per_layer[suffix] = (rows, flax_shapes[paths[0]][0]) if transpose else (rows,)
    d = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_hidden_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{i}.{suffix}"] = shape
    return shapes


def _empty_params(cfg: ModelConfig, dtype: np.dtype) -> Params:
    """Preallocated host arrays in the Flax layout; the table and head are always fp32."""
    layers: Params = {}
    for path, shape in _flax_layer_shapes(cfg).items():
        node = layers
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.empty((cfg.num_hidden_layers, *shape), dtype)
    params: Params = {
        "embedding": np.empty((cfg.vocab_size, cfg.hidden_size), np.float32),
        "layers": layers,
        "norm": {"scale": np.empty((cfg.hidden_size,), dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": np.empty((cfg.hidden_size, cfg.vocab_size), np.float32)}
    return params


def _leaf(tree: Params, path: LayerPath) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return tree


def _slots(cfg: ModelConfig, params: Params, name: str) -> tuple[list[tuple[np.ndarray, Any]], bool]:
    """([(destination array, index into it)] in row order, transpose?) for a HF tensor name."""
    if name == "model.embed_tokens.weight":
        return [(params["embedding"], Ellipsis)], False
    if name == "model.norm.weight":
        return [(params["norm"]["scale"], Ellipsis)], False
    if name == "lm_head.weight":
        return [(params["lm_head"]["kernel"], Ellipsis)], True
    parts = name.split(".")  # model.layers.{i}.{suffix}
    layer, suffix = int(parts[2]), ".".join(parts[3:])
    paths, transpose = _layer_tensors(cfg)[suffix]
    return [(_leaf(params["layers"], path), layer) for path in paths], transpose


def load_hf(path_or_hub_id: str, dtype=jnp.float32, *, as_numpy: bool = False) -> tuple[ModelConfig, Params]:
    """Reads a HF checkpoint of a supported family (or a Llama .gguf file) into (ModelConfig, params).

    `dtype` is the storage dtype of the transformer body; the embedding table and an
    untied head stay float32 because they are what Phase 1 trains. `as_numpy=True` keeps
    host arrays (the caller places them on devices with its own shardings).
    """
    ckpt_dir = resolve_checkpoint(path_or_hub_id)
    cfg = read_config(ckpt_dir)
    files = weight_files(ckpt_dir)
    expected = _expected_shapes(cfg)
    params = _empty_params(cfg, np.dtype(dtype))
    seen: set[str] = set()
    for path, name, arr in _iter_tensors(files):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied export may carry a copy of the table; the table is authoritative
        if name not in expected:
            raise CheckpointFormatError(
                f"{path}: unexpected tensor {name!r}; wake2vec's {cfg.model_type} has no such weight "
                "(a bias or module this family does not have in transformers either)"
            )
        if tuple(arr.shape) != expected[name]:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, but config.json implies "
                f"{expected[name]}; the config and the weights disagree"
            )
        slots, transpose = _slots(cfg, params, name)
        pieces = np.split(arr, np.cumsum([dest.shape[-1] for dest, _ in slots])[:-1], axis=0)
        for (dest, index), piece in zip(slots, pieces):
            dest[index] = piece.T if transpose else piece
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise CheckpointFormatError(f"{ckpt_dir}: {len(missing)} weight tensor(s) missing from {[f.name for f in files]}: {shown}")
    if not as_numpy:
        params = to_device(params)
    return cfg, params


def drop_padding_rows(params: Params, tokenizer_size: int) -> Params:
    """The params with the table (and an untied head) cut to the tokenizer's rows.

    Qwen2.5 and Phi-3.5 ship matrices with more rows than their tokenizers have tokens
    (Qwen2.5-14B: 152,064 rows, 151,665 tokens). New tokens take ids from len(tokenizer)
    on, as transformers' add_tokens assigns them; without this cut the first ones (399 of
    the Wake's, in the study) would land on padding rows that no initialiser wrote and no
    statistic saw. After it, every new id gets a fresh row however the base was padded,
    and the grown table has exactly the shape and base rows of transformers'
    `resize_token_embeddings(len(tokenizer))`. Rows past the tokenizer are never produced
    by it, so nothing a user can type is lost.
    """
    out = dict(params, embedding=params["embedding"][:tokenizer_size])
    if "lm_head" in params:
        out["lm_head"] = {"kernel": params["lm_head"]["kernel"][:, :tokenizer_size]}
    return out


def to_device(host: Params, shardings=None) -> Params:
    """Moves a nested dict of host arrays to devices one leaf at a time, emptying `host`.

    Each host leaf is dropped as soon as its copy is on the device, so moving a 4.4 GB body
    never holds two copies of it (a tree_map of jnp.asarray / device_put does, until the
    whole tree is done). `shardings`, when given, is a tree of the same structure; without
    it every leaf goes to the default device.
    """
    out: Params = {}
    for key in list(host):
        value = host.pop(key)
        target = None if shardings is None else shardings[key]
        if isinstance(value, dict):
            out[key] = to_device(value, target)
        else:
            # device_put copies once and drops its hold on the host array when the copy
            # completes; blocking here lets the host copy go before the next leaf.
            out[key] = jax.block_until_ready(jax.device_put(value, target))
        del value
    return out


def hf_state_dict(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """Flax params -> {HF name: host array} in HF's (out, in) layout, padding rows dropped."""
    host = jax.tree_util.tree_map(np.asarray, params)
    host.update(padding.unpad({k: host[k] for k in ("embedding", "lm_head") if k in host}, cfg.vocab_size))
    tensors = {"model.embed_tokens.weight": host["embedding"]}
    for i in range(cfg.num_hidden_layers):
        for suffix, (paths, transpose) in _layer_tensors(cfg).items():
            pieces = [_leaf(host["layers"], path)[i] for path in paths]
            pieces = [p.T if transpose else p for p in pieces]
            tensors[f"model.layers.{i}.{suffix}"] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    tensors["model.norm.weight"] = host["norm"]["scale"]
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = host["lm_head"]["kernel"].T
    return tensors


def save_hf(cfg: ModelConfig, params: Params, out_dir, tokenizer=None, source_config: dict | None = None) -> pathlib.Path:
    """Writes config.json + model.safetensors (+ the tokenizer) loadable by transformers.

    Tensors keep the dtype they have in `params`, so a round trip is bit-exact. config.json
    names the widest of them: transformers' default dtype="auto" casts every tensor to it,
    so a float32 trained table beside a bf16 body loads as trained, not rounded to bf16.
    `source_config` (the source's config.json) is written as it came, with vocab_size,
    tie_word_embeddings and the dtype replaced, so what ModelConfig does not model (a list
    eos_token_id, pad_token_id, ...) survives.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(cfg, params)
    widest = max((np.dtype(t.dtype) for t in tensors.values()), key=lambda d: d.itemsize)
    torch_dtype = {np.dtype(np.float64): "float64", np.dtype(np.float32): "float32",
                   np.dtype(np.float16): "float16"}.get(widest, "bfloat16")
    write_safetensors(out / "model.safetensors", tensors)
    config = cfg.to_hf_dict(torch_dtype)
    if source_config is not None:
        # transformers 5 reads "dtype" before the older "torch_dtype": both must agree.
        config = {**source_config, "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_word_embeddings,
                  "torch_dtype": torch_dtype, "dtype": torch_dtype}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def load_vocab_rows(ckpt_dir: pathlib.Path) -> dict:
    """Only the rows Phase 1 trains, as float32 host arrays: {"embedding": (V, D)} and, for an
    untied source, {"lm_head": {"kernel": (D, V)}}.

    Preparing a run needs nothing else, so the rest of the body is never read or upcast
    (TinyLlama: the table is 0.13 GB of a 2.2 GB bf16 checkpoint).
    """
    cfg = read_config(ckpt_dir)
    expected = _expected_shapes(cfg)
    wanted = {"model.embed_tokens.weight"} | (set() if cfg.tie_word_embeddings else {"lm_head.weight"})
    params: Params = {"embedding": None}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": None}
    for path, name, arr in _iter_tensors(weight_files(ckpt_dir), frozenset(wanted)):
        if tuple(arr.shape) != expected[name]:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, but config.json implies {expected[name]}"
            )
        rows = np.array(arr, np.float32)  # a copy: the read buffer is immutable
        if name == "lm_head.weight":
            params["lm_head"]["kernel"] = np.ascontiguousarray(rows.T)
        else:
            params["embedding"] = rows
        wanted.discard(name)
    if wanted:
        raise CheckpointFormatError(f"{ckpt_dir}: weight tensor(s) {sorted(wanted)} missing")
    return params
