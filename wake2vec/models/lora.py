"""LoRA adapters on the frozen body (Phase 2): their spec, initial values, merge, norms and PEFT files.

Phase 2 trains low-rank updates of the body's projections over the frozen Phase 1 table.
Each adapted projection's output gains scale * (dropout(x) @ a) @ b, with a (in, r),
b (r, out) and scale = alpha / r: exactly PEFT's default (non-rsLoRA) LoRA, written with
wake2vec's (in, out) kernel convention, so PEFT's lora_A / lora_B weights are a / b
transposed. The model (wake2vec.models.model) reads the adapters as the Flax collection "lora",
stacked on the layer axis like the weights:

    {"layers": {"self_attn": {"q_proj": {"a": (L, in, r), "b": (L, r, out)}, ...},
                "mlp": {"gate_proj": {...}, ...}}}

They stay float32 in storage whatever the body's dtype (they are what trains), and are
small enough (a few MB for a 1B model) to be replicated rather than sharded.

Why PEFT's file format for export: it is what a user of the trained adapters loads
(`PeftModel.from_pretrained`) without wake2vec, and what users bring adapters in. `merge`
folds the adapters into the kernels for an export that needs no PEFT at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.models import convert, model, safetensors_codec
from wake2vec.training import hosts
from wake2vec.models.lora_spec import PROJECTIONS, STUDY_TARGETS, LoraSpec  # noqa: F401 (re-exported: lora.LoraSpec)
from wake2vec.config import FlagError, ModelConfig
from wake2vec.errors import UserError
from wake2vec.training.workdir import OutputDirError

_BLOCK = {name: "self_attn" if name in PROJECTIONS[:4] else "mlp" for name in PROJECTIONS}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModelForCausalLM > LoraModel > *ForCausalLM > *Model: the path PEFT saves its keys under.
_PEFT_PREFIX = "base_model.model.model.layers"
_PEFT_KEY = re.compile(rf"{re.escape(_PEFT_PREFIX)}\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

Adapters = dict


class PeftFormatError(UserError, ValueError):
    """A PEFT adapter directory is missing, malformed, or uses a LoRA variant wake2vec does not model."""


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj,v_proj' -> ('q_proj', 'v_proj'), in PROJECTIONS order; an unknown name is a FlagError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROJECTIONS]
    if unknown or not names:
        raise FlagError(f"--lora_targets={text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'names none'}; "
                        f"choose a comma list of {', '.join(PROJECTIONS)}")
    return tuple(p for p in PROJECTIONS if p in names)


def adapter_shapes(cfg: ModelConfig, spec: LoraSpec) -> Adapters:
    """The "lora" collection's structure as the model declares it (ShapeDtypeStructs), traced, not run.

    Read from the model itself, so the tree always has the names nn.scan gives its modules.
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    module = model.LlamaModel(cfg, lora=spec)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids, ids, jnp.ones((1, 1, 1), bool))
    return variables["lora"]


def check_rank(cfg: ModelConfig, spec: LoraSpec) -> None:
    """Refuses a rank above an adapted matrix's smaller side: past it the update is no longer
    low-rank, only larger (a rank of 100,000 on hidden size 128 wrote 7 GB of checkpoints)."""
    sides = {}
    for block, name, a, b in _projections(adapter_shapes(cfg, dataclasses.replace(spec, rank=1)), spec):
        sides[name] = min(a.shape[-2], b.shape[-1])
    name = min(sides, key=sides.get)
    if spec.rank > sides[name]:
        raise FlagError(f"--lora_rank={spec.rank} exceeds {name}'s smaller side ({sides[name]}); a LoRA update of "
                        f"that matrix has rank at most {sides[name]}: choose --lora_rank <= {sides[name]}")


def _projections(adapters: Adapters, spec: LoraSpec):
    """(block, projection name, a, b) for each adapted projection, in PROJECTIONS order."""
    for name in spec.targets:
        leaf = adapters["layers"][_BLOCK[name]][name]
        yield _BLOCK[name], name, leaf["a"], leaf["b"]


def init_adapters(cfg: ModelConfig, spec: LoraSpec, rng: jax.Array) -> Adapters:
    """Float32 adapters initialised as PEFT does by default: b = 0, so training starts at the base model;
    a as lora_A's kaiming_uniform(a=sqrt(5)) on its (r, in) weight, which is uniform(+-1/sqrt(in)).

    Each projection's draw depends only on `rng` and its name, not on the other targets.
    """
    tree = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), adapter_shapes(cfg, spec))
    for block, name, a, _ in _projections(tree, spec):
        bound = 1.0 / math.sqrt(a.shape[1])
        key = jax.random.fold_in(rng, PROJECTIONS.index(name))
        tree["layers"][block][name]["a"] = jax.random.uniform(key, a.shape, jnp.float32, -bound, bound)
    return tree


def merge(params: dict, adapters: Adapters, spec: LoraSpec) -> dict:
    """New params whose adapted kernels are kernel + scale * a @ b (formed in float32, stored in the kernel's dtype).

    The result is the plain model (`lora=None`) that computes what the adapted one does,
    up to that rounding: what an export without PEFT writes.
    """
    layers = {block: dict(modules) for block, modules in params["layers"].items()}
    for block, name, a, b in _projections(adapters, spec):
        kernel = params["layers"][block][name]["kernel"]
        if not jnp.issubdtype(kernel.dtype, jnp.floating):
            raise ValueError(f"cannot merge LoRA into {block}.{name}: its kernel is {kernel.dtype}, not a float dtype")
        update = spec.scale * jnp.einsum("lir,lro->lio", jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        merged = (jnp.asarray(kernel, jnp.float32) + update).astype(kernel.dtype)
        layers[block][name] = {**layers[block][name], "kernel": merged}
    return {**params, "layers": layers}


def adapter_norms(adapters: Adapters, spec: LoraSpec) -> dict:
    """{projection: {"update": [||scale a b||_F per layer], "a": [||a||_F], "b": [||b||_F]}} as python floats.

    ||a b||_F^2 = trace((a^T a)(b b^T)), two r x r Gram matrices, so no (in, out) update is
    formed. float64 on the host: the trace sums terms that cancel when b is small.
    """
    norms = {}
    for _, name, a, b in _projections(adapters, spec):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        squared = np.sum(np.einsum("lir,lis->lrs", a, a) * np.einsum("lro,lso->lrs", b, b), axis=(1, 2))
        norms[name] = {
            "update": (spec.scale * np.sqrt(np.maximum(squared, 0.0))).tolist(),
            "a": np.linalg.norm(a, axis=(1, 2)).tolist(),
            "b": np.linalg.norm(b, axis=(1, 2)).tolist(),
        }
    return norms


def check_adapters(cfg: ModelConfig, spec: LoraSpec, adapters: Adapters) -> None:
    """Raises PeftFormatError unless `adapters` have exactly the structure and shapes `cfg` and `spec` imply."""
    expected = jax.tree_util.tree_map(lambda s: s.shape, adapter_shapes(cfg, spec))
    got = jax.tree_util.tree_map(np.shape, adapters)
    if expected != got:
        raise PeftFormatError(f"the LoRA adapters do not fit the model (rank {spec.rank}, targets {spec.targets}, "
                              f"{cfg.num_hidden_layers} layers): shapes {got}, expected {expected}")


def _peft_config(spec: LoraSpec, base_model_name_or_path: str) -> dict:
    """The adapter_config.json fields PEFT 0.21 writes that set the LoRA computation, with PEFT's values.

    Fields PEFT would default anyway are still written, so a PEFT whose defaults change
    loads the same adapters; experimental variants' fields (their defaults: off) are not.
    """
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


@hosts.writer_only
def export_peft(directory, adapters: Adapters, spec: LoraSpec, model_cfg: ModelConfig, base_model_name_or_path: str) -> pathlib.Path:
    """Writes `directory` (new or empty) as a PEFT LoRA adapter for the base model: adapter_config.json
    and adapter_model.safetensors (float32, PEFT's key names and (r, in) / (out, r) layout).

    The files are written into a staging directory beside it, renamed into place at the
    end, so a kill leaves no half-written adapter. Phi-3's fused qkv_proj / gate_up_proj
    have no per-projection modules in transformers to attach separate adapters to. Only the
    writer process writes (hosts.writer_only); the others return None.
    """
    out = pathlib.Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputDirError(f"{out} is not empty; export the LoRA adapter into a new or empty directory")
    if model_cfg.fused_projections:
        raise PeftFormatError(f"{model_cfg.model_type} fuses its projections in transformers; "
                              "export a merged model (lora.merge, convert.save_hf) instead of a PEFT adapter")
    check_adapters(model_cfg, spec, adapters)
    tensors = {}
    for block, name, a, b in _projections(adapters, spec):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for i in range(model_cfg.num_hidden_layers):
            tensors[f"{_PEFT_PREFIX}.{i}.{block}.{name}.lora_A.weight"] = a[i].T
            tensors[f"{_PEFT_PREFIX}.{i}.{block}.{name}.lora_B.weight"] = b[i].T
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    convert.write_safetensors(staging / ADAPTER_WEIGHTS, tensors)
    (staging / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(spec, base_model_name_or_path), indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above): os.replace needs the name free
    os.replace(staging, out)
    return out


# adapter_config.json values that would make PEFT compute something other than plain LoRA.
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none", "fan_in_fan_out": False,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None}


def load_peft(directory) -> tuple[Adapters, LoraSpec]:
    """Reads a PEFT LoRA adapter directory (PEFT's own or `export_peft`'s) into (adapters, spec).

    The targets are the projections the weights hold. Variants the model does not compute
    (DoRA, rsLoRA, per-module ranks, biases, a subset of layers) are refused, one line naming
    the field. Check the result against the model with `check_adapters`.
    """
    path = pathlib.Path(directory)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PeftFormatError(f"{path / ADAPTER_CONFIG}: not a readable PEFT adapter config ({e})") from e
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters can be loaded")
    for field, plain in _UNSUPPORTED.items():
        if config.get(field) not in (plain, None, {}, [], False):  # absent, null or empty: off
            raise PeftFormatError(f"{path / ADAPTER_CONFIG}: {field}={config[field]!r} is a LoRA variant wake2vec does not compute")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise PeftFormatError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    found: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for key, array in safetensors_codec.iter_tensors(weights):
        match = _PEFT_KEY.fullmatch(key)
        if match is None or match[3] not in PROJECTIONS or _BLOCK[match[3]] != match[2]:
            raise PeftFormatError(f"{weights}: tensor {key!r} is not a LoRA weight of a Llama-family projection")
        found.setdefault((match[3], match[4]), {})[int(match[1])] = np.asarray(array, np.float32)
    if not found:
        raise PeftFormatError(f"{weights}: holds no LoRA weights")
    targets = tuple(p for p in PROJECTIONS if (p, "A") in found or (p, "B") in found)
    layers = 1 + max(max(per_layer) for per_layer in found.values())
    if any(sorted(found.get((p, m), {})) != list(range(layers)) for p in targets for m in "AB"):
        raise PeftFormatError(f"{weights}: every adapted projection needs lora_A and lora_B in each of {layers} layers")
    spec = LoraSpec(targets, int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0)))
    tree: dict = {"layers": {}}
    for name in targets:
        a = np.stack([found[(name, "A")][i].T for i in range(layers)])
        b = np.stack([found[(name, "B")][i].T for i in range(layers)])
        if a.shape[2] != spec.rank or b.shape[1] != spec.rank:
            raise PeftFormatError(f"{weights}: {name}'s weights have rank {a.shape[2]}, but r={spec.rank} in {ADAPTER_CONFIG}")
        tree["layers"].setdefault(_BLOCK[name], {})[name] = {"a": a, "b": b}
    return tree, spec
