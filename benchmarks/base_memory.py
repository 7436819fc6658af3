"""The supported bases: table shapes, checkpoint sizes and the Phase 1 step's compiled memory.

    python -m benchmarks.base_memory [--out=docs/bases.md] [--only=llama-3.2-1b,...]

For each base the study ran (and its reference, TinyLlama), the architecture comes from the
numbers of the checkpoint's public config.json, written out below because nothing here
downloads. The vocabulary grows by the Wake tokens the study measured for that tokenizer
(TinyLlama's measured on its tokenizer), or, where no tokenizer was at hand, by the whole
44,990-word lexicon: an upper bound, marked "<=", since words already in a vocabulary add
no row. A padded matrix is cut to its tokenizer first (convert.drop_padding_rows).

The Phase 1 step is the real one (train.make_train_step with the optimiser the flags build)
under TrainConfig's defaults, the reference recipe: a tied table, 256-token blocks, 1 x 16
accumulation, Adafactor, full remat, float32 compute; the frozen body is stored in bf16
(--frozen_dtype=bfloat16). It is compiled with jax.jit(...).lower(...).compile() on
jax.ShapeDtypeStruct arguments only, so no weight is ever allocated, and the memory is XLA's
memory_analysis() of that executable: arguments (body, state, batch) + outputs + temporaries
- aliased (the state is donated, as the training loop donates it). "Fits" means that peak
is at most 90% of the card's memory (the rest for the CUDA context, library workspaces and
fragmentation).

The figure belongs to the backend the script ran on (the table says which). The arguments
(resident: the bf16 body, the fp32 table and its optimiser state) are the same on any
backend; the temporaries are not. With fp32 compute every bf16 weight is converted at its
matmul, and XLA's loop-invariant code motion may hoist those converts out of the layer
loop, materialising an fp32 copy of the whole body (the CPU backend does: TinyLlama's
temporaries are 5.4 GiB with a bf16 body, 1.8 GiB with an fp32 one). So each step is
compiled twice: with XLA's default passes, and with while-loop-invariant-code-motion
disabled (one layer converted at a time). A card is "yes" when the default peak fits,
"maybe" when only the per-layer one does (it depends on what the backend hoists; rerun the
script on that GPU to settle it), "no" otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from wake2vec.models import model, quant
from wake2vec.training import optim, parallel, train
from wake2vec.config import ModelConfig, RopeScaling, TrainConfig, dtype_from_name

_OUT = flags.DEFINE_string("out", "docs/bases.md", "Markdown table to write (a .json with the raw figures beside it)")
_ONLY = flags.DEFINE_list("only", [], "names of the bases to measure (default: all)")

GIB = 1024**3
LEXICON_WORDS = 44_990  # lines of ../shared/data/wake_lexicon.txt
# Memory the cards report (nvidia-smi), GiB.
CARDS = {"T4 16 GB": 15.0, "L4 24 GB": 22.5, "A100 80 GB": 80.0}
HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class Base:
    name: str
    checkpoint: str
    tokenizer_size: int
    # Wake tokens the study's add_tokens gave with this tokenizer; None: not measured here.
    wake_added: int | None
    cfg: ModelConfig


def _llama3(layers, hidden, mlp, heads, factor, tied):
    return ModelConfig(
        vocab_size=128_256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=8, head_dim=hidden // heads, rope_theta=500_000.0,
        max_position_embeddings=131_072, tie_word_embeddings=tied, bos_token_id=128_000, eos_token_id=128_001,
        rope_scaling=RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    )


BASES = [
    Base("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", 32_000, 44_500, ModelConfig(
        vocab_size=32_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048)),
    Base("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 128_256, 44_195, _llama3(16, 2048, 8192, 32, 32.0, True)),
    Base("llama-3.2-3b", "meta-llama/Llama-3.2-3B", 128_256, 44_195, _llama3(28, 3072, 8192, 24, 32.0, True)),
    Base("llama-3.1-8b", "meta-llama/Llama-3.1-8B", 128_256, 44_195, _llama3(32, 4096, 14_336, 32, 8.0, False)),
    Base("mistral-7b-v0.3", "mistralai/Mistral-7B-v0.3", 32_768, 44_553, ModelConfig(
        vocab_size=32_768, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=32_768, model_type="mistral")),
    Base("qwen2.5-14b", "Qwen/Qwen2.5-14B", 151_665, None, ModelConfig(
        vocab_size=152_064, hidden_size=5120, intermediate_size=13_824, num_hidden_layers=48, num_attention_heads=40,
        num_key_value_heads=8, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131_072, model_type="qwen2")),
    Base("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", 32_011, None, ModelConfig(
        vocab_size=32_064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=131_072, model_type="phi3", sliding_window=262_144)),
        # (its longrope factors are left out: frequencies change no shape and no memory)
    Base("gemma-2-9b", "google/gemma-2-9b", 256_000, None, ModelConfig(
        vocab_size=256_000, hidden_size=3584, intermediate_size=14_336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True,
        model_type="gemma2", hidden_act="gelu_pytorch_tanh", sliding_window=4096,
        layer_types=tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(42)),
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
]


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def abstract_body(cfg: ModelConfig, frozen_dtype: str) -> dict:
    """The frozen body (no table, no head) in --frozen_dtype, as ShapeDtypeStructs (nothing allocated)."""
    quantized = frozen_dtype in quant.FORMATS
    dtype = jnp.float32 if quantized else dtype_from_name(frozen_dtype)
    params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.PRNGKey(0), dtype))
    body = {k: v for k, v in params.items() if k not in ("embedding", "lm_head")}
    # int8 / nf4 leaves in place of the float kernels (wake2vec.models.quant)
    return quant.abstract_body(body, frozen_dtype) if quantized else body


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def compiled_memory(tx, schedule, settings: train.StepSettings, trainable: dict, frozen: dict, batch_shape) -> dict:
    """XLA's memory analysis of train.make_train_step(tx, schedule, settings) on abstract
    (trainable, frozen, batch) arguments, the state donated as the loop donates it; compiled
    twice: with the default passes, and with while-loop-invariant-code-motion off."""
    state = _abstract(jax.eval_shape(lambda t, f: train.init_state(t, f, tx), trainable, frozen))
    batch = jax.ShapeDtypeStruct(tuple(batch_shape), jnp.int32)
    step = train.make_train_step(tx, schedule, settings)
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch)
    started = time.process_time()
    default = lowered.compile().memory_analysis()
    compile_cpu_s = time.process_time() - started
    per_layer = lowered.compile(compiler_options={"xla_disable_hlo_passes": "while-loop-invariant-code-motion"})
    per_layer = per_layer.memory_analysis()

    def peak(mem):
        return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes

    return {
        "arguments_bytes": default.argument_size_in_bytes,
        "outputs_bytes": default.output_size_in_bytes,
        "temp_bytes": default.temp_size_in_bytes,
        "alias_bytes": default.alias_size_in_bytes,
        "peak_bytes": peak(default),
        "temp_bytes_per_layer_converts": per_layer.temp_size_in_bytes,
        "peak_bytes_per_layer_converts": peak(per_layer),
        "compile_cpu_s": round(compile_cpu_s, 1),
    }


def padded_rows(cfg: ModelConfig) -> int:
    """The table's rows as the loop pads them on one device."""
    return parallel.padded_vocab(cfg.vocab_size, parallel.make_mesh("1,1", jax.devices()[:1]))


def step_memory(cfg: ModelConfig, base_size: int, train_cfg: TrainConfig) -> dict:
    """XLA's memory analysis of the compiled Phase 1 step for a grown config (nothing allocated)."""
    rows = padded_rows(cfg)
    frozen = abstract_body(cfg, train_cfg.frozen_dtype)
    trainable = {"embedding": jax.ShapeDtypeStruct((rows, cfg.hidden_size), jnp.float32)}
    tx = optim.make_optimizer(train_cfg, base_size)
    settings = train.StepSettings(cfg, dtype_from_name(train_cfg.compute_dtype), train_cfg.remat, train_cfg.loss_chunk)
    batch_shape = (train_cfg.grad_accum, train_cfg.batch_size, train_cfg.seq_len)
    return {
        "table_rows_padded": rows,
        "frozen_bytes": tree_bytes(frozen),
        **compiled_memory(tx, optim.make_schedule(train_cfg), settings, trainable, frozen, batch_shape),
    }


def measure(base: Base, train_cfg: TrainConfig) -> dict:
    added = base.wake_added if base.wake_added is not None else LEXICON_WORDS
    grown = base.cfg.replace(vocab_size=base.tokenizer_size + added, tie_word_embeddings=train_cfg.tie_embeddings)
    return {
        "name": base.name,
        "family": base.cfg.model_type,
        "checkpoint": base.checkpoint,
        "matrix_rows": base.cfg.vocab_size,
        "tokenizer_size": base.tokenizer_size,
        "wake_added": added,
        "wake_added_is_upper_bound": base.wake_added is None,
        "table_shape": [grown.vocab_size, grown.hidden_size],
        "tied_in_checkpoint": base.cfg.tie_word_embeddings,
        "params": base.cfg.num_params,
        "checkpoint_bf16_bytes": 2 * base.cfg.num_params,
        **step_memory(grown, base.tokenizer_size, train_cfg),
    }


def render(rows: list[dict], backend: str) -> str:
    lines = [
        "<!-- written by `python -m benchmarks.base_memory`; do not edit by hand -->",
        f"Phase 1 step memory: XLA memory_analysis() on the {backend} backend, frozen body in bf16, "
        "TrainConfig defaults otherwise (tied table, 256-token blocks, 1 x 16 accumulation, Adafactor, full remat, "
        "fp32 compute). Resident: the step's arguments (body, table, optimiser state, batch), the same on any "
        "backend; peak adds outputs and temporaries, less what the donated state aliases. "
        "Per-layer converts: the same step compiled with XLA's while-loop-invariant-code-motion off, so no fp32 "
        f"copy of the whole bf16 body is hoisted out of the layer loop. Fits (<= {HEADROOM:.0%} of the card): yes "
        "if the peak fits, maybe if only the per-layer peak does, no otherwise. `<=`: no tokenizer at hand, the "
        "whole lexicon counted.",
        "",
        "| family | example checkpoint | base vocab (matrix rows) | Wake tokens added | table after injection "
        "| checkpoint (bf16) | step: resident | step: peak | peak, per-layer converts | " + " | ".join(CARDS) + " |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|" + ":-:|" * len(CARDS),
    ]
    for r in rows:
        padded = r["matrix_rows"] != r["tokenizer_size"]
        vocab = f"{r['tokenizer_size']:,}" + (f" ({r['matrix_rows']:,})" if padded else "")
        added = ("<= " if r["wake_added_is_upper_bound"] else "") + f"{r['wake_added']:,}"
        shape = ("<= " if r["wake_added_is_upper_bound"] else "") + f"{r['table_shape'][0]:,} x {r['table_shape'][1]:,}"
        peak, low = r["peak_bytes"] / GIB, r["peak_bytes_per_layer_converts"] / GIB
        fits = ["yes" if peak <= HEADROOM * c else "maybe" if low <= HEADROOM * c else "no" for c in CARDS.values()]
        lines.append(
            f"| {r['family']} | {r['checkpoint']} | {vocab} | {added} | {shape} | "
            f"{r['checkpoint_bf16_bytes'] / GIB:.1f} GiB | {r['arguments_bytes'] / GIB:.1f} GiB | {peak:.1f} GiB | "
            f"{low:.1f} GiB | " + " | ".join(fits) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    train_cfg = TrainConfig(frozen_dtype="bfloat16")
    bases = [b for b in BASES if not _ONLY.value or b.name in _ONLY.value]
    rows = []
    for base in bases:
        rows.append(measure(base, train_cfg))
        r = rows[-1]
        print(f"{base.name}: table {r['table_shape']}, step peak {r['peak_bytes'] / GIB:.2f} GiB "
              f"(temp {r['temp_bytes'] / GIB:.2f}; per-layer converts {r['peak_bytes_per_layer_converts'] / GIB:.2f}), "
              f"compile {r['compile_cpu_s']} CPU-s", flush=True)
    backend = jax.default_backend()
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, backend), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"backend": backend, "bases": rows}, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    app.run(main)
