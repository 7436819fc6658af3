"""The Phase 1 train step, wake2vec against the original pipeline's, side by side.

    python -m benchmarks.benchmark                     # CPU: both shapes, both memory policies
    python -m benchmarks.benchmark --shape=default --remat=none --repeats=7   # one shape, one policy
    python -m benchmarks.benchmark --shape=tinyllama_ref --remat=full --frozen_dtype=bfloat16 --compute_dtype=bfloat16  # GPU
    python -m benchmarks.benchmark --shape=smollm2     # real weights: SmolLM2-135M from its GGUF file

The smollm2 shape runs both contenders on the real SmolLM2-135M-Instruct weights (its GGUF
file, dequantized by wake2vec and by transformers' own GGUF loader), with the table grown
by the 44,416 rows the Wake lexicon adds (mean_noise rows, the same values on both sides).

Contenders, same shape, same random token batch, same machine, in one process:

* wake2vec: `train.make_train_step` (embedding-only gradients, chunked loss, partitioned
  Adafactor) placed, jitted and compiled on the launcher's mesh by the launcher's own code
  (`wake2vec.training.placement`; `--mesh` as the launchers'), exactly what experiments/train_p1 runs;
* the original: transformers' `LlamaForCausalLM` in PyTorch with every weight frozen, the
  input embedding tied to the head as the only trainable tensor, transformers' Adafactor
  (scale_parameter=False, relative_step=False: HF Trainer's optim="adafactor"), grad clip 1.0.

Each memory policy is matched on both sides: `--remat=full` against HF's gradient
checkpointing, `none` against none. Repetitions alternate between the two so that machine
noise hits both alike, each after a short idle gap (and with OpenMP threads told not to
spin) so that neither runs while the other's worker threads still hold the cores; the
report gives medians with min/max of wall time and, on a CPU, of the process's CPU-seconds
(the figure that survives a shared machine: another job's time slices are not ours), the
tokens/s ratio on both, wake2vec's achieved model FLOP/s against a matmul peak in the
compute dtype measured in the same run, and how much of the machine other processes used
meanwhile. On a GPU or TPU only wall time is reported: a step is timed until its whole
output state is ready, and the host's CPU-seconds would count only its dispatch.

FLOPs are counted analytically (`step_flops`), not taken from XLA's cost analysis: XLA
counts the body of a `scan` once, and this step scans over layers and microbatches, so
its figure is low by up to layers x microbatches.
"""

from __future__ import annotations

import os

# Both runtimes park idle worker threads; spinning ones (OpenMP's default) would steal the
# cores from whichever contender runs next. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402
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
_MESH = flags.DEFINE_string("mesh", "", "wake2vec's 'data,model' mesh, as the launchers' --mesh; empty: their default.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time the PyTorch step (needs torch).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 leaves torch's default.")
_GAP = flags.DEFINE_float("gap", 0.5, "Idle seconds before each timed step, so neither contender inherits the other's busy threads.")
DEFAULT_GGUF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_GGUF = flags.DEFINE_string("gguf", DEFAULT_GGUF, "The model file of --shape=smollm2.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile wake2vec's step and print XLA's FLOP and memory analysis (no timing).")


def _model_config(shape: dict):
    from wake2vec.config import ModelConfig

    return ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(2048, shape["seq"]),
                       tie_word_embeddings=True)


def on_cpu() -> bool:
    """CPU-seconds are the honest figure on a shared CPU; on an accelerator they count only
    the host's dispatch, so the reports keep them for the CPU alone."""
    import jax

    return jax.default_backend() == "cpu"


def matmul_peak_flops(dtype: str = "float32", size: int | None = None, repeats: int = 10) -> tuple[float, float]:
    """The matmul rate of this machine through XLA in `dtype`: (FLOP per wall second, per CPU-second).

    The 'peak' MFU is measured against, in the operands' dtype of the step's matmuls (the
    compute dtype): a bf16 step held against an fp32 peak would flatter a GPU by its tensor
    cores' factor and a CPU the other way. The benchmark samples it between the steps it
    times (a few products per round), so that the peak sees the same machine load as the
    steps; the per-CPU-second figure is the one a busy CPU leaves honest. The default size
    is 2,048 on a CPU and 8,192 elsewhere, where a smaller product is mostly launch overhead.
    """
    import jax
    import jax.numpy as jnp

    from wake2vec.config import dtype_from_name

    size = size or (2048 if on_cpu() else 8192)
    a = jnp.ones((size, size), dtype_from_name(dtype))
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        dot(a).block_until_ready()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return 2 * size**3 / statistics.median(walls), 2 * size**3 / max(statistics.median(cpus), 1e-9)


def real_weights(shape: dict, gguf: str):
    """(ModelConfig, host params) of the GGUF file with the table grown to shape["vocab"] rows (seeded mean_noise)."""
    from wake2vec.models import convert
    from wake2vec.tokens import vocab

    cfg, params = convert.load_hf(gguf, as_numpy=True)
    table = params.pop("embedding")
    params["embedding"] = vocab.grow_table(table, shape["vocab"] - table.shape[0], "mean_noise", seed=0)
    return cfg.replace(vocab_size=shape["vocab"], tie_word_embeddings=True), params


def token_batch(shape: dict, placed):
    """The shape's (accum, batch, seq) random token ids, seeded, split over the mesh as the loop splits a batch."""
    import jax
    import numpy as np

    ids = np.random.default_rng(0).integers(0, shape["vocab"], (shape["accum"], shape["batch"], shape["seq"]))
    return jax.device_put(ids.astype(np.int32), placed.batch_sharding)


def wake2vec_inputs(shape: dict, frozen_dtype: str = "float32", mesh: str = "", gguf: str = DEFAULT_GGUF):
    """The model config, the weights placed on the launcher's mesh (`--mesh` spelling), the
    optimiser, schedule and token batch for the shape: built once, shared by every remat
    policy's compiled step."""
    import jax
    import jax.numpy as jnp

    from wake2vec.models import model
    from wake2vec.training import optim, parallel, placement
    from wake2vec.config import TrainConfig, dtype_from_name

    cfg = _model_config(shape)
    if shape.get("real"):
        cfg, params = real_weights(shape, gguf)
        table = params.pop("embedding")
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype_from_name(frozen_dtype)), params)
        params["embedding"] = jnp.asarray(table, jnp.float32)
    else:
        params = model.init_params(cfg, jax.random.PRNGKey(0), dtype=dtype_from_name(frozen_dtype))
    tc = TrainConfig(max_steps=1000, grad_accum=shape["accum"], batch_size=shape["batch"], seq_len=shape["seq"])
    mesh = parallel.make_mesh(mesh)
    trainable, frozen = optim.split_params(params)
    del params
    tx = optim.make_optimizer(tc, 32_000, cfg.vocab_size)
    placed = placement.place(trainable, frozen, tx, mesh, parallel.padded_vocab(cfg.vocab_size, mesh))
    return dict(cfg=cfg, placement=placed, trainable=placed.trainable, frozen=placed.frozen, tx=tx,
                schedule=optim.make_schedule(tc), batch=token_batch(shape, placed))


def wake2vec_step(inputs: dict, remat: str, compute_dtype: str = "float32"):
    """(run_one_step, the compiled step) under one remat policy: the launcher's sharded step
    (wake2vec.training.placement), the state donated step to step. A step is over when its
    whole output state is ready, not only its loss: on an accelerator the optimiser's update
    may still run after the loss is done."""
    import jax

    from wake2vec.training import placement, train
    from wake2vec.config import dtype_from_name

    placed = inputs["placement"]
    settings = train.StepSettings(inputs["cfg"], dtype_from_name(compute_dtype), remat, loss_chunk=1024)
    holder = {"state": placement.initial_state(placed, inputs["tx"])}
    compiled = placement.compile_train_step(train.make_train_step(inputs["tx"], inputs["schedule"], settings), placed,
                                            holder["state"], inputs["batch"].shape)

    def run():
        holder["state"], _ = jax.block_until_ready(compiled(holder["state"], placed.frozen, inputs["batch"]))

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


def compiled_peak_bytes(compiled) -> int:
    """XLA's own account of the step's device memory: arguments + outputs + temporaries, less
    the outputs that reuse donated arguments (the figure base_memory's tables quote)."""
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes)


def torch_step(shape: dict, *, gguf: str = DEFAULT_GGUF, threads: int = 0, device: str = "cpu", body_dtype=None,
               autocast_dtype=None, attn_implementation: str | None = None):
    """The original pipeline's step: frozen LlamaForCausalLM, tied table trainable, HF Adafactor.

    Returns make_run(remat, batch_shape=None): one model for every policy and batch shape
    ((accum, batch, seq), default the shape's own), gradient checkpointing switched on for
    any remat but 'none' (HF's checkpointing recomputes each layer, as remat="full").
    `body_dtype` (a torch dtype) stores every weight but the table in it, the table staying
    float32 as wake2vec keeps it; `autocast_dtype` runs the forward under torch.autocast, the
    torch counterpart of wake2vec's compute dtype. On CUDA a step ends with a synchronize, so
    its time is the device's, not the launch queue's.
    """
    import contextlib

    import numpy as np
    import torch
    import transformers
    from transformers.optimization import Adafactor

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if shape.get("real"):
        llama = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        llama.resize_token_embeddings(shape["vocab"], mean_resizing=False)
        with torch.no_grad():  # the same grown table as wake2vec's
            llama.get_input_embeddings().weight.copy_(torch.from_numpy(real_weights(shape, gguf)[1]["embedding"]))
        llama.to(device)
    else:
        config = transformers.LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
            max_position_embeddings=max(2048, shape["seq"]), tie_word_embeddings=True)
        with torch.device(device):  # initialised where it runs: no host copy of a 1.1B body
            llama = transformers.LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation)
    table = llama.get_input_embeddings().weight
    if body_dtype is not None:
        llama.to(body_dtype)
        table.data = table.data.float()  # tied: the head is this same parameter
    llama.train()
    for param in llama.parameters():
        param.requires_grad_(False)
    table.requires_grad_(True)
    assert llama.lm_head.weight is table  # tied: one unified matrix, as the reference run
    optimizer = Adafactor([table], lr=5e-4, scale_parameter=False, relative_step=False, warmup_init=False)
    kind = torch.device(device).type
    synchronize = torch.cuda.synchronize if kind == "cuda" else (lambda: None)

    def forward_context():
        return torch.autocast(kind, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()

    def make_run(remat: str, batch_shape: tuple[int, int, int] | None = None):
        accum, batch, seq = batch_shape or (shape["accum"], shape["batch"], shape["seq"])
        rng = np.random.default_rng(0)
        micro = [torch.as_tensor(rng.integers(0, shape["vocab"], (batch, seq)), device=device) for _ in range(accum)]

        def run():
            if remat == "none":
                llama.gradient_checkpointing_disable()
            else:
                llama.gradient_checkpointing_enable()
            for ids in micro:  # HF Trainer's gradient accumulation: scaled losses, summed grads
                with forward_context():
                    loss = llama(input_ids=ids, labels=ids).loss / accum
                loss.backward()
            torch.nn.utils.clip_grad_norm_([table], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()

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


def _summary(name: str, walls: list[float], cpus: list[float] | None, tokens: int) -> str:
    wall = statistics.median(walls)
    cpu = "" if cpus is None else (f", {statistics.median(cpus):.2f} CPU-s/step "
                                   f"(min {min(cpus):.2f}, max {max(cpus):.2f})")
    return (f"{name:9s} median {wall:.3f} s/step (min {min(walls):.3f}, max {max(walls):.3f}){cpu}: "
            f"{tokens / wall:,.0f} tokens/s")


@dataclasses.dataclass
class Timings:
    """Per contender the wall and CPU seconds of each timed step, the peaks sampled between
    rounds, and the busy-machine line of the timed stretch."""

    walls: dict[str, list[float]]
    cpus: dict[str, list[float]]
    peaks: list[tuple[float, float]]
    load: str

    def median_wall(self, contender: str) -> float:
        return statistics.median(self.walls[contender])

    def peak(self) -> tuple[float, float]:
        """(per wall second, per CPU-second): the medians over the rounds."""
        wall, cpu = (statistics.median(p) for p in zip(*self.peaks))
        return wall, cpu


def time_contenders(contenders: dict, *, warmup: int, repeats: int, gap: float, peak) -> Timings:
    """Warms each contender up, then times `repeats` alternating rounds (so that machine noise
    hits both alike), each step after `gap` idle seconds; `peak()` is sampled once a round."""
    for run in contenders.values():
        for _ in range(warmup):
            run()
    walls: dict[str, list[float]] = {name: [] for name in contenders}
    cpus: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = []
    start, own_cpu = _machine_jiffies(), time.process_time()
    for _ in range(repeats):
        for contender, run in contenders.items():
            time.sleep(gap)  # let the other contender's worker threads go idle
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls[contender].append(time.perf_counter() - wall)
            cpus[contender].append(time.process_time() - cpu)
        peaks.append(peak())  # the peak under the same load, round by round
    end, own_cpu = _machine_jiffies(), time.process_time() - own_cpu
    return Timings(walls, cpus, peaks, load_report(start, end, own_cpu))


def benchmark_policy(name: str, shape: dict, remat: str, ours, theirs, *, warmup: int, repeats: int, gap: float,
                     compute_dtype: str) -> None:
    """Times one shape under one matched memory policy and prints its report lines: wall and
    CPU-seconds on a CPU, wall (device) time alone on an accelerator."""
    tokens = shape["batch"] * shape["accum"] * shape["seq"]
    contenders = {"wake2vec": ours}
    if theirs is not None:
        contenders["pytorch"] = theirs
    cpu = on_cpu()
    timings = time_contenders(contenders, warmup=warmup, repeats=repeats, gap=gap,
                              peak=lambda: matmul_peak_flops(compute_dtype, repeats=3))
    peak, peak_per_cpu = timings.peak()
    print(f"[{name}, remat={remat} vs {'HF gradient checkpointing' if remat != 'none' else 'no checkpointing'}, "
          f"{repeats} alternating repeats]")
    if cpu:
        print(timings.load)
    for contender in contenders:
        print(_summary(contender, timings.walls[contender], timings.cpus[contender] if cpu else None, tokens))
    med = {c: (timings.median_wall(c), statistics.median(timings.cpus[c])) for c in contenders}
    if "pytorch" in med:
        ratio = f"ratio wake2vec / pytorch tokens/s: {med['pytorch'][0] / med['wake2vec'][0]:.2f}x wall"
        print(ratio + (f", {med['pytorch'][1] / med['wake2vec'][1]:.2f}x CPU-s" if cpu else ""))
    flops, hardware = step_flops(shape, remat)
    achieved, per_cpu = flops / med["wake2vec"][0], flops / med["wake2vec"][1]
    line = (f"wake2vec: {flops / 1e9:.1f} GFLOP model FLOPs per step ({hardware / 1e9:.1f} with recompute), "
            f"{achieved / 1e9:.1f} GFLOP/s achieved; {compute_dtype} matmul peak measured now {peak / 1e9:.1f} GFLOP/s "
            f"-> MFU {achieved / peak:.0%}")
    if cpu:
        line += (f"; per CPU-second {per_cpu / 1e9:.1f} of {peak_per_cpu / 1e9:.1f} GFLOP "
                 f"-> {per_cpu / peak_per_cpu:.0%}")
    print(line, flush=True)


def main(argv):
    del argv
    import jax

    for name in _SHAPE.value:
        shape = SHAPES[name]
        tokens = shape["batch"] * shape["accum"] * shape["seq"]
        print(f"shape {name}: {shape}; {tokens} tokens per step; devices {jax.devices()}", flush=True)
        inputs = wake2vec_inputs(shape, _FROZEN_DTYPE.value, _MESH.value, _GGUF.value)
        print(f"mesh {dict(inputs['placement'].mesh.shape)}", flush=True)
        make_torch_run = (torch_step(shape, gguf=_GGUF.value, threads=_THREADS.value)
                          if _TORCH.value and not _COMPILE_ONLY.value else None)
        for remat in _REMAT.value:
            ours, compiled = wake2vec_step(inputs, remat, _COMPUTE_DTYPE.value)
            print(describe_compiled(compiled, shape, remat), flush=True)
            if not _COMPILE_ONLY.value:
                benchmark_policy(name, shape, remat, ours, make_torch_run and make_torch_run(remat),
                                 warmup=_WARMUP.value, repeats=_REPEATS.value or shape.get("repeats", 7),
                                 gap=_GAP.value, compute_dtype=_COMPUTE_DTYPE.value)
            del ours, compiled
            gc.collect()
        del inputs, make_torch_run
        gc.collect()


if __name__ == "__main__":
    app.run(main)
