"""The Phase 1 train step, wake2vec against the original pipeline's, side by side.

    python -m benchmarks.benchmark                     # CPU: both shapes, both memory policies
    python -m benchmarks.benchmark --shape=default --remat=none --repeats=7   # one shape, one policy
    python -m benchmarks.benchmark --shape=tinyllama_ref --remat=full --frozen_dtype=bfloat16 --compute_dtype=bfloat16  # GPU
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

Each memory policy is matched on both sides: `--remat=full` against HF's gradient
checkpointing, `none` against none. Repetitions alternate between the two so that machine
noise hits both alike, each after a short idle gap (and with OpenMP threads told not to
spin) so that neither runs while the other's worker threads still hold the cores; the
report gives medians with min/max of wall time and of the process's CPU-seconds (the
figure that survives a shared machine: another job's time slices are not ours), the
tokens/s ratio on both, wake2vec's achieved model FLOP/s against a float32 matmul peak
measured in the same run, and how much of the machine other processes used meanwhile.

FLOPs are counted analytically (`step_flops`), not taken from XLA's cost analysis: XLA
counts the body of a `scan` once, and this step scans over layers and microbatches, so
its figure is low by up to layers x microbatches.
"""

from __future__ import annotations

import os

# Both runtimes park idle worker threads; spinning ones (OpenMP's default) would steal the
# cores from whichever contender runs next. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

SHAPES = {
    # Vocab-heavy like Phase 1 (the table dominates), small enough for a 2-core CPU.
    "default": dict(vocab=76_500, hidden=512, mlp=1408, layers=4, heads=8, kv_heads=1, seq=256, batch=4, accum=1),
    # TinyLlama-1.1B's exact body with the Wake's vocabulary (the reference injection), one
    # 256-token block per step: what a CPU can time. ~25 CPU-s a step, hence 3 repeats.
    "tinyllama": dict(vocab=76_500, hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4, seq=256, batch=1, accum=1,
                      repeats=3),
    # The same with the reference step (1 block x 16 accumulated), for a GPU.
    "tinyllama_ref": dict(vocab=76_500, hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4, seq=256, batch=1,
                          accum=16),
    # SmolLM2-135M's real weights with the Wake's 44,416 rows added; 4 blocks of 256 per step.
    "smollm2": dict(vocab=93_568, hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, seq=256, batch=1, accum=4,
                    real=True),
}

_SHAPE = flags.DEFINE_multi_enum("shape", ["default", "tinyllama"], list(SHAPES), "Model and batch shapes, in turn.")
_REPEATS = flags.DEFINE_integer(
    "repeats", None, "Timed steps per contender and policy (after warm-up); default: the shape's own, else 7.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps per contender and policy (allocator, first-touch).")
_FROZEN_DTYPE = flags.DEFINE_string("frozen_dtype", "float32", "wake2vec's frozen-body storage dtype.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "wake2vec's matmul dtype.")
_REMAT = flags.DEFINE_multi_enum(
    "remat", ["full", "none"], ["full", "dots", "none"],
    "wake2vec's remat policies, in turn; torch uses gradient checkpointing unless 'none'.")
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


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> tuple[float, float]:
    """Float32 matmul rate of this machine through XLA: (FLOP per wall second, per CPU-second).

    The 'peak' MFU is measured against. The benchmark samples it between the steps it times
    (a few products per round), so that the peak sees the same machine load as the steps;
    the per-CPU-second figure is the one a busy machine leaves honest.
    """
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        dot(a).block_until_ready()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return 2 * size**3 / statistics.median(walls), 2 * size**3 / statistics.median(cpus)


def real_weights(shape: dict):
    """(ModelConfig, host params) of --gguf with the table grown to shape["vocab"] rows (seeded mean_noise)."""
    from wake2vec.models import convert
    from wake2vec.tokens import vocab

    cfg, params = convert.load_hf(_GGUF.value, as_numpy=True)
    table = params.pop("embedding")
    params["embedding"] = vocab.grow_table(table, shape["vocab"] - table.shape[0], "mean_noise", seed=0)
    return cfg.replace(vocab_size=shape["vocab"], tie_word_embeddings=True), params


def wake2vec_inputs(shape: dict):
    """The model config, trainable and frozen weights, optimiser, schedule and token batch
    for the shape: built once, shared by every remat policy's compiled step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from wake2vec.models import model
    from wake2vec.training import optim, parallel
    from wake2vec.models import padding
    from wake2vec.config import TrainConfig, dtype_from_name

    cfg = _model_config(shape)
    if shape.get("real"):
        cfg, host = real_weights(shape)
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype_from_name(_FROZEN_DTYPE.value)), host)
        params["embedding"] = jnp.asarray(host["embedding"], jnp.float32)
    else:
        params = model.init_params(cfg, jax.random.PRNGKey(0), dtype=dtype_from_name(_FROZEN_DTYPE.value))
    tc = TrainConfig(max_steps=1000, grad_accum=shape["accum"], batch_size=shape["batch"], seq_len=shape["seq"])
    rows = parallel.padded_vocab(cfg.vocab_size, parallel.make_mesh(""))
    params.update(padding.pad(optim.split_params(params)[0], rows))
    trainable, frozen = optim.split_params(params)
    tx = optim.make_optimizer(tc, 32_000, cfg.vocab_size)
    batch = jnp.asarray(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (shape["accum"], shape["batch"], shape["seq"])), jnp.int32)
    return dict(cfg=cfg, trainable=trainable, frozen=frozen, tx=tx, schedule=optim.make_schedule(tc), batch=batch)


def wake2vec_step(inputs: dict, remat: str):
    """(run_one_step, the compiled step) under one remat policy; the state is donated step to step."""
    import jax

    from wake2vec.training import train
    from wake2vec.config import dtype_from_name

    settings = train.StepSettings(inputs["cfg"], dtype_from_name(_COMPUTE_DTYPE.value), remat, loss_chunk=1024)
    step = jax.jit(train.make_train_step(inputs["tx"], inputs["schedule"], settings), donate_argnums=(0,))
    holder = {"state": train.init_state(inputs["trainable"], inputs["frozen"], inputs["tx"])}
    compiled = step.lower(holder["state"], inputs["frozen"], inputs["batch"]).compile()

    def run():
        holder["state"], metrics = compiled(holder["state"], inputs["frozen"], inputs["batch"])
        metrics["loss"].block_until_ready()

    return run, compiled


def step_flops_parts(shape: dict) -> tuple[float, float, float]:
    """(body forward, head with both gradients, whole step) model FLOPs of one step, matmuls only.

    Model FLOPs (what MFU is quoted on): the forward pass; the backward pass's activation
    gradients through the frozen body (no weight gradients: it is not differentiated);
    and both gradients of the head (it is the trained table).
    """
    d, f, layers, seq = shape["hidden"], shape["mlp"], shape["layers"], shape["seq"]
    head_dim = d // shape["heads"]
    body = layers * (2 * d * d + 2 * d * shape["kv_heads"] * head_dim + 3 * d * f)
    attention = layers * 2 * 2 * seq * d  # QK^T and PV over the full (masked) sequence
    head = shape["vocab"] * d
    forward = 2 * body + attention + 2 * head
    backward = 2 * body + 2 * attention + 2 * head + 2 * head
    tokens = shape["batch"] * shape["accum"] * seq
    return (2 * body + attention) * tokens, 6 * head * tokens, (forward + backward) * tokens


def step_flops(shape: dict, remat: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one embedding-only step, matmuls only.

    Hardware FLOPs add the forward recomputation that remat="full" performs in the
    backward pass (HF's gradient checkpointing performs the same).
    """
    body_forward, _, model = step_flops_parts(shape)
    return model, model + (body_forward if remat != "none" else 0)


def describe_compiled(compiled, shape: dict, remat: str) -> str:
    memory = compiled.memory_analysis()
    gb = 1e9
    model, hardware = step_flops(shape, remat)
    return (f"wake2vec's step (remat={remat}): {model / 1e12:.2f} TFLOP model, {hardware / 1e12:.2f} TFLOP with remat recompute; "
            f"XLA memory analysis: arguments "
            f"{memory.argument_size_in_bytes / gb:.2f} GB, outputs {memory.output_size_in_bytes / gb:.2f} GB "
            f"(aliased with donated arguments: {memory.alias_size_in_bytes / gb:.2f} GB), temporaries "
            f"{memory.temp_size_in_bytes / gb:.2f} GB")


def torch_step(shape: dict):
    """The original pipeline's step: frozen LlamaForCausalLM, tied table trainable, HF Adafactor.

    Returns make_run(remat): one model for both policies, gradient checkpointing switched on
    for any remat but 'none' (HF's checkpointing recomputes each layer, as remat="full").
    """
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
    for param in llama.parameters():
        param.requires_grad_(False)
    table = llama.get_input_embeddings().weight
    table.requires_grad_(True)
    assert llama.lm_head.weight is table  # tied: one unified matrix, as the reference run
    optimizer = Adafactor([table], lr=5e-4, scale_parameter=False, relative_step=False, warmup_init=False)
    rng = np.random.default_rng(0)
    micro = [torch.as_tensor(rng.integers(0, shape["vocab"], (shape["batch"], shape["seq"]))) for _ in range(shape["accum"])]

    def make_run(remat: str):
        def run():
            if remat == "none":
                llama.gradient_checkpointing_disable()
            else:
                llama.gradient_checkpointing_enable()
            for ids in micro:  # HF Trainer's gradient accumulation: scaled losses, summed grads
                (llama(input_ids=ids, labels=ids).loss / shape["accum"]).backward()
            torch.nn.utils.clip_grad_norm_([table], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    return make_run


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat (Linux only)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def load_report(start, end, own_cpu_s: float) -> str:
    """One line: was the machine busy while we timed? Other processes' share of its CPU time.

    /proc/stat counts every process's CPU time; subtracting our own process's leaves what
    other jobs took from the same cores during the timed steps.
    """
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if start is None or end is None:
        return f"machine: {cores} cores, load average {load} (1/5/15 min); /proc/stat unavailable"
    ticks = os.sysconf("SC_CLK_TCK")
    busy, total = end[0] - start[0], end[1] - start[1]
    others = max(0.0, busy / ticks - own_cpu_s) / (total / ticks)
    verdict = "BUSY (figures below are noisier; read the CPU-s columns)" if others > 0.1 else "idle"
    return (f"machine: {cores} cores, load average {load} (1/5/15 min); during the timed steps other processes "
            f"used {others:.0%} of its CPU time -> {verdict}")


def _summary(name: str, walls: list[float], cpus: list[float], tokens: int) -> str:
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return (f"{name:9s} median {wall:.3f} s/step (min {min(walls):.3f}, max {max(walls):.3f}), "
            f"{cpu:.2f} CPU-s/step (min {min(cpus):.2f}, max {max(cpus):.2f}): {tokens / wall:,.0f} tokens/s")


def benchmark_policy(name: str, shape: dict, remat: str, ours, theirs) -> None:
    """Times one shape under one matched memory policy and prints its report lines."""
    tokens = shape["batch"] * shape["accum"] * shape["seq"]
    contenders = {"wake2vec": ours}
    if theirs is not None:
        contenders["pytorch"] = theirs
    for run in contenders.values():
        for _ in range(_WARMUP.value):
            run()
    repeats = _REPEATS.value or shape.get("repeats", 7)
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = []
    start, own_cpu = _machine_jiffies(), time.process_time()
    for _ in range(repeats):
        for contender, run in contenders.items():  # alternate, so noise hits both alike
            time.sleep(_GAP.value)  # let the other contender's worker threads go idle
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls[contender].append(time.perf_counter() - wall)
            cpus[contender].append(time.process_time() - cpu)
        peaks.append(matmul_peak_flops(repeats=3))  # the peak under the same load, round by round
    end, own_cpu = _machine_jiffies(), time.process_time() - own_cpu
    peak, peak_per_cpu = (statistics.median(p) for p in zip(*peaks))
    print(f"[{name}, remat={remat} vs {'HF gradient checkpointing' if remat != 'none' else 'no checkpointing'}, "
          f"{repeats} alternating repeats]")
    print(load_report(start, end, own_cpu))
    for contender in contenders:
        print(_summary(contender, walls[contender], cpus[contender], tokens))
    med = {c: (statistics.median(walls[c]), statistics.median(cpus[c])) for c in contenders}
    if "pytorch" in med:
        print(f"ratio wake2vec / pytorch tokens/s: {med['pytorch'][0] / med['wake2vec'][0]:.2f}x wall, "
              f"{med['pytorch'][1] / med['wake2vec'][1]:.2f}x CPU-s")
    flops, hardware = step_flops(shape, remat)
    achieved, per_cpu = flops / med["wake2vec"][0], flops / med["wake2vec"][1]
    print(f"wake2vec: {flops / 1e9:.1f} GFLOP model FLOPs per step ({hardware / 1e9:.1f} with recompute), "
          f"{achieved / 1e9:.1f} GFLOP/s achieved; float32 matmul peak measured now {peak / 1e9:.1f} GFLOP/s "
          f"-> MFU {achieved / peak:.0%}; per CPU-second {per_cpu / 1e9:.1f} of {peak_per_cpu / 1e9:.1f} GFLOP "
          f"-> {per_cpu / peak_per_cpu:.0%}", flush=True)


def main(argv):
    del argv
    import jax

    for name in _SHAPE.value:
        shape = SHAPES[name]
        tokens = shape["batch"] * shape["accum"] * shape["seq"]
        print(f"shape {name}: {shape}; {tokens} tokens per step; devices {jax.devices()}", flush=True)
        inputs = wake2vec_inputs(shape)
        make_torch_run = torch_step(shape) if _TORCH.value and not _COMPILE_ONLY.value else None
        for remat in _REMAT.value:
            ours, compiled = wake2vec_step(inputs, remat)
            print(describe_compiled(compiled, shape, remat), flush=True)
            if not _COMPILE_ONLY.value:
                benchmark_policy(name, shape, remat, ours, make_torch_run and make_torch_run(remat))
            del ours, compiled
            gc.collect()
        del inputs, make_torch_run
        gc.collect()


if __name__ == "__main__":
    app.run(main)
