"""HF Llama checkpoints <-> wake2vec parameters, without building a torch model.

`load_hf` reads config.json and the weights (safetensors, single or sharded with an index,
or pytorch_model.bin through `torch.load(weights_only=True)`), checks every tensor's name
and shape against the config, and writes each one straight into its slot of the stacked
Flax layout (layer axis first, kernels transposed to (in, out)). Tensors are read one at a
time into preallocated stacked arrays, so peak host memory is the converted weights plus
the largest single tensor, not two copies of the model.

`save_hf` is the inverse: it streams the tensors back in HF's names and (out, in) layout
into model.safetensors, beside a config.json that transformers loads unchanged.

safetensors files are read and written by the small codec below rather than through the
`safetensors` package because it gives bf16/fp16 support through ml_dtypes without torch,
and lets a single tensor be read into memory without mapping the whole file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from wake2vec import gguf_model
from wake2vec.config import ModelConfig
from wake2vec.errors import UserError

Params = dict[str, Any]


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory or weight file is missing, malformed or disagrees with its config."""


_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

# Per-layer HF tensor name -> (path in the stacked Flax tree, is a (out, in) matrix to transpose).
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("input_layernorm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), False),
}
# Buffers some older exports carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- safetensors codec


def _read_safetensors_header(path: pathlib.Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFormatError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _iter_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) one tensor at a time, each read into its own buffer."""
    header, data_start = _read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            if info["dtype"] not in _ST_DTYPES:
                raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            dtype = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            buf = f.read(end - begin)
            if len(buf) != end - begin:
                raise CheckpointFormatError(f"{path}: tensor {name} is truncated (file too short)")
            yield name, np.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes tensors in the safetensors layout, streaming each to disk in turn."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"cannot store tensor {name} of dtype {arr.dtype} in safetensors")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


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


def source_hash(ckpt_dir: pathlib.Path) -> str:
    """sha256 over the config and weight files' names and bytes: identifies a frozen body."""
    if gguf_model.is_gguf(ckpt_dir):
        return gguf_model.source_hash(ckpt_dir)
    digest = hashlib.sha256()
    for f in [ckpt_dir / "config.json", *weight_files(ckpt_dir)]:
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
        raise CheckpointFormatError(f"{ckpt_dir}: config.json is missing; a HF Llama checkpoint directory needs one")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_path}: invalid JSON ({e})") from e
    return ModelConfig.from_hf_dict(hf, source=str(config_path))


def _iter_tensors(files: list[pathlib.Path]) -> Iterator[tuple[pathlib.Path, str, np.ndarray]]:
    for path in files:
        if gguf_model.is_gguf(path):
            yield from ((path, name, arr) for name, arr in gguf_model.iter_tensors(path))
            continue
        if path.suffix == ".safetensors":
            for name, arr in _iter_safetensors(path):
                yield path, name, arr
            continue
        import torch  # only .bin checkpoints need torch

        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            if tensor.dtype == torch.bfloat16:
                arr = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                arr = tensor.numpy()
            yield path, name, arr
        del state


# --------------------------------------------------------------------------- load / save


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    per_layer = {
        "self_attn.q_proj.weight": (cfg.num_attention_heads * hd, d),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.num_attention_heads * hd),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
    }
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
    per_layer = _expected_shapes(cfg.replace(num_hidden_layers=1))
    for suffix, (path, transpose) in _LAYER_TENSORS.items():
        shape = per_layer[f"model.layers.0.{suffix}"]
        shape = shape[::-1] if transpose else shape
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


def _slot(params: Params, name: str) -> tuple[np.ndarray, Any, bool]:
    """(destination array, index into it, transpose?) for a HF tensor name."""
    if name == "model.embed_tokens.weight":
        return params["embedding"], Ellipsis, False
    if name == "model.norm.weight":
        return params["norm"]["scale"], Ellipsis, False
    if name == "lm_head.weight":
        return params["lm_head"]["kernel"], Ellipsis, True
    parts = name.split(".")  # model.layers.{i}.{suffix}
    layer, suffix = int(parts[2]), ".".join(parts[3:])
    path, transpose = _LAYER_TENSORS[suffix]
    node = params["layers"]
    for key in path:
        node = node[key]
    return node, layer, transpose


def load_hf(path_or_hub_id: str, dtype=jnp.float32, *, as_numpy: bool = False) -> tuple[ModelConfig, Params]:
    """Reads a HF Llama checkpoint (or a Llama .gguf file) into (ModelConfig, params).

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
                f"{path}: unexpected tensor {name!r}; wake2vec's Llama has no such weight "
                "(biases and other architectures are not supported)"
            )
        if tuple(arr.shape) != expected[name]:
            raise CheckpointFormatError(
                f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, but config.json implies "
                f"{expected[name]}; the config and the weights disagree"
            )
        dest, index, transpose = _slot(params, name)
        dest[index] = arr.T if transpose else arr
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        shown = missing[:5] + (["..."] if len(missing) > 5 else [])
        raise CheckpointFormatError(f"{ckpt_dir}: {len(missing)} weight tensor(s) missing from {[f.name for f in files]}: {shown}")
    if not as_numpy:
        params = to_device(params)
    return cfg, params


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
    tensors = {"model.embed_tokens.weight": host["embedding"][: cfg.vocab_size]}
    for i in range(cfg.num_hidden_layers):
        for suffix, (path, transpose) in _LAYER_TENSORS.items():
            node = host["layers"]
            for key in path:
                node = node[key]
            tensors[f"model.layers.{i}.{suffix}"] = node[i].T if transpose else node[i]
    tensors["model.norm.weight"] = host["norm"]["scale"]
    if not cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = host["lm_head"]["kernel"][:, : cfg.vocab_size].T
    return tensors


def save_hf(cfg: ModelConfig, params: Params, out_dir, tokenizer=None) -> pathlib.Path:
    """Writes config.json + model.safetensors (+ the tokenizer) loadable by transformers.

    Tensors keep the dtype they have in `params`, so a round trip is bit-exact.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(cfg, params)
    body_dtype = tensors["model.layers.0.self_attn.q_proj.weight"].dtype if cfg.num_hidden_layers else np.float32
    torch_dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(np.dtype(body_dtype), "bfloat16")
    write_safetensors(out / "model.safetensors", tensors)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(torch_dtype), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
