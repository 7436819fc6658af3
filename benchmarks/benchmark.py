"""The Phase 1 train step, wake2vec against the original pipeline's, side by side.

    python -m benchmarks.benchmark                     # CPU, the vocab-heavy default shape
    python -m benchmarks.benchmark --shape=tinyllama --frozen_dtype=bfloat16 --compute_dtype=bfloat16  # GPU
    python -m benchmarks.benchmark --shape=smollm2     # real weights: SmolLM2-135M from its GGUF file

The smollm2 shape runs both contenders on the real SmolLM2-135M-Instruct weights (its GGUF
file, dequantized by wake2vec and by transformers' own GGUF loader), with the table grown
by the 44,416 rows the Wake lexicon adds (mean_noise rows, the same values on both sides).

Contenders, same shape, same random token batch, same machine, in one process:

* wake2vec: the jitted `train.make_train_step` (embedding-only gradients, chunked loss,
  partitioned Adafactor), exactly what experiments/train_p1 runs;
* the original: transformers' `LlamaForCausalLM` in PyTorch with every weight frozen, the
  input embedding tied to the head as the only trainable tensor, transformers' Adafactor
  (scale_parameter=False, relative_step=False: HF Trainer's optim="adafactor"), grad clip 1.0.

Repetitions alternate between the two so that machine noise hits both alike, each after a
short idle gap (and with OpenMP threads told not to spin) so that neither runs while the
other's worker threads still hold the cores; the report
gives medians, the tokens/s ratio, and wake2vec's achieved model FLOP/s against a float32
matmul peak measured in the same run.

FLOPs are counted analytically (`step_flops`), not taken from XLA's cost analysis: XLA
counts the body of a `scan` once, and this step scans over layers and microbatches, so
its figure is low by up to layers x microbatches.
"""

from __future__ import annotations

import os

# Both runtimes park idle worker threads; spinning ones (OpenMP's default) would steal the
# cores from whichever contender runs next. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

SHAPES = {
    # Vocab-heavy like Phase 1 (the table dominates), small enough for a 2-core CPU.
    "default": dict(vocab=76_500, hidden=512, mlp=1408, layers=4, heads=8, kv_heads=1, seq=256, batch=4, accum=1),
    # TinyLlama-1.1B with the Wake's vocabulary and the reference step (1 block x 16 accumulated), for a GPU.
    "tinyllama": dict(vocab=76_500, hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4, seq=256, batch=1, accum=16),
    # SmolLM2-135M's real weights with the Wake's 44,416 rows added; 4 blocks of 256 per step.
    "smollm2": dict(vocab=93_568, hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, seq=256, batch=1, accum=4,
                    real=True),
}

_SHAPE = flags.DEFINE_enum("shape", "default", list(SHAPES), "Model and batch shape.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed steps per contender (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per contender (compilation, allocator).")
_FROZEN_DTYPE = flags.DEFINE_string("frozen_dtype", "float32", "wake2vec's frozen-body storage dtype.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "wake2vec's matmul dtype.")
_REMAT = flags.DEFINE_string("remat", "none", "wake2vec's remat policy; torch uses gradient checkpointing unless 'none'.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch step (needs torch).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 leaves torch's default.")
_GAP = flags.DEFINE_float("gap", 0.5, "Idle seconds before each timed step, so neither contender inherits the other's busy threads.")
_GGUF = flags.DEFINE_string(
    "gguf", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "The model file of --shape=smollm2.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile wake2vec's step and print XLA's FLOP and memory analysis (no timing).")


def _model_config(shape: dict):
    from wake2vec.config import ModelConfig

    return ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq"]),
                       tie_word_embeddings=True)


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """Float32 matmul FLOP/s of this machine through XLA (the 'peak' MFU is measured against)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def real_weights(shape: dict):
    """(ModelConfig, host params) of --gguf with the table grown to shape["vocab"] rows (seeded mean_noise)."""
    from wake2vec import convert, vocab

    cfg, params = convert.load_hf(_GGUF.value, as_numpy=True)
    table = params.pop("embedding")
    params["embedding"] = vocab.grow_table(table, shape["vocab"] - table.shape[0], "mean_noise", seed=0)
    return cfg.replace(vocab_size=shape["vocab"], tie_word_embeddings=True), params


def wake2vec_step(shape: dict):
    """(run_one_step, the compiled step) for the shape."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from wake2vec import model, optim, padding, parallel, train
    from wake2vec.config import TrainConfig, dtype_from_name

    cfg = _model_config(shape)
    if shape.get("real"):
        cfg, host = real_weights(shape)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype_from_name(_FROZEN_DTYPE.value)), host)
        params["embedding"] = jnp.asarray(host["embedding"], jnp.float32)
    else:
        params = model.init_params(cfg, jax.random.PRNGKey(0), dtype=dtype_from_name(_FROZEN_DTYPE.value))
    tc = TrainConfig(max_steps=1000, grad_accum=shape["accum"], batch_size=shape["batch"], seq_len=shape["seq"])
    mesh = parallel.make_mesh("")
    rows = parallel.padded_vocab(cfg.vocab_size, mesh)
    params.update(padding.pad(optim.split_params(params)[0], rows))
    trainable, frozen = optim.split_params(params)
    tx = optim.make_optimizer(tc, 32_000, cfg.vocab_size)
    settings = train.StepSettings(cfg, dtype_from_name(_COMPUTE_DTYPE.value), _REMAT.value, loss_chunk=1024)
    step = jax.jit(train.make_train_step(tx, optim.make_schedule(tc), settings), donate_argnums=(0,))
    batch = jnp.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (shape["accum"], shape["batch"], shape["seq"])), jnp.int32)
    state = train.init_state(trainable, frozen, tx)
    compiled = step.lower(state, frozen, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, batch)
        metrics["loss"].block_until_ready()

    return run, compiled


def step_flops(shape: dict, remat: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one embedding-only step, matmuls only.

    Model FLOPs (what MFU is quoted on): the forward pass; the backward pass's activation
    gradients through the frozen body (no weight gradients: it is not differentiated);
    and both gradients of the head (it is the trained table). Hardware FLOPs add the
    forward recomputation that remat="full" performs in the backward pass.
    """
    d, f, layers, seq = shape["hidden"], shape["mlp"], shape["layers"], shape["seq"]
    head_dim = d // shape["heads"]
    body = layers * (2 * d * d + 2 * d * shape["kv_heads"] * head_dim + 3 * d * f)
    attention = layers * 2 * 2 * seq * d  # QK^T and PV over the full (masked) sequence
    head = shape["vocab"] * d
    forward = 2 * body + attention + 2 * head
    backward = 2 * body + 2 * attention + 2 * head + 2 * head
    tokens = shape["batch"] * shape["accum"] * seq
    model = (forward + backward) * tokens
    recompute = (2 * body + attention) * tokens if remat != "none" else 0
    return model, model + recompute


def describe_compiled(compiled, shape: dict) -> str:
    memory = compiled.memory_analysis()
    gb = 1e9
    model, hardware = step_flops(shape, _REMAT.value)
    return (f"wake2vec's step: {model / 1e12:.2f} TFLOP model, {hardware / 1e12:.2f} TFLOP with remat recompute; "
            f"XLA memory analysis: arguments "
            f"{memory.argument_size_in_bytes / gb:.2f} GB, outputs {memory.output_size_in_bytes / gb:.2f} GB "
            f"(aliased with donated arguments: {memory.alias_size_in_bytes / gb:.2f} GB), temporaries "
            f"{memory.temp_size_in_bytes / gb:.2f} GB")


def torch_step(shape: dict):
    """The original pipeline's step: frozen LlamaForCausalLM, tied table trainable, HF Adafactor."""
    import numpy as np
    import torch
    import transformers
    from transformers.optimization import Adafactor

    if _THREADS.value:
        torch.set_num_threads(_THREADS.value)
    torch.manual_seed(0)
    if shape.get("real"):
        llama = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(_GGUF.value), gguf_file=os.path.basename(_GGUF.value))
        llama.resize_token_embeddings(shape["vocab"], mean_resizing=False)
        with torch.no_grad():  # the same grown table as wake2vec's
            llama.get_input_embeddings().weight.copy_(torch.from_numpy(real_weights(shape)[1]["embedding"]))
    else:
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=True))
    llama.train()
    if _REMAT.value != "none":
        llama.gradient_checkpointing_enable()
    for param in llama.parameters():
        param.requires_grad_(False)
    table = llama.get_input_embeddings().weight
    table.requires_grad_(True)
    assert llama.lm_head.weight is table  # tied: one unified matrix, as the reference run
    optimizer = Adafactor([table], lr=5e-4, scale_parameter=False, relative_step=False, warmup_init=False)
    rng = np.random.default_rng(0)
    micro = [torch.as_tensor(rng.integers(0, shape["vocab"], (shape["batch"], shape["seq"]))) for _ in range(shape["accum"])]

    def run():
        for ids in micro:  # HF Trainer's gradient accumulation: scaled losses, summed grads
            (llama(input_ids=ids, labels=ids).loss / shape["accum"]).backward()
        torch.nn.utils.clip_grad_norm_([table], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def main(argv):
    del argv
    import jax

    shape = SHAPES[_SHAPE.value]
    tokens = shape["batch"] * shape["accum"] * shape["seq"]
    print(f"shape {_SHAPE.value}: {shape}; {tokens} tokens per step; devices {jax.devices()}")
    ours, compiled = wake2vec_step(shape)
    print(describe_compiled(compiled, shape))
    if _COMPILE_ONLY.value:
        return
    flops, _ = step_flops(shape, _REMAT.value)
    contenders = {"wake2vec": ours}
    if _TORCH.value:
        contenders["pytorch"] = torch_step(shape)
    for run in contenders.values():
        for _ in range(_WARMUP.value):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(_REPEATS.value):
        for name, run in contenders.items():  # alternate, so noise hits both alike
            time.sleep(_GAP.value)  # let the other contender's worker threads go idle
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    peak = matmul_peak_flops()
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        spread = f"min {min(times[name]):.3f} s, max {max(times[name]):.3f} s"
        print(f"{name:9s} median {median:.3f} s/step ({spread}): {tokens / median:,.0f} tokens/s; "
              f"median {statistics.median(cpu[name]):.3f} CPU-s/step (all threads)")
    if "pytorch" in medians:
        print(f"ratio wake2vec / pytorch tokens/s: {medians['pytorch'] / medians['wake2vec']:.2f}x; "
              f"CPU-seconds per step, pytorch / wake2vec: {statistics.median(cpu['pytorch']) / statistics.median(cpu['wake2vec']):.2f}x")
    achieved = flops / medians["wake2vec"]
    print(f"wake2vec: {flops / 1e9:.1f} GFLOP model FLOPs per step, {achieved / 1e9:.1f} GFLOP/s achieved; "
          f"float32 matmul peak measured now {peak / 1e9:.1f} GFLOP/s -> MFU {achieved / peak:.0%}")


if __name__ == "__main__":
    app.run(main)
