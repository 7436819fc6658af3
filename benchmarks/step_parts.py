"""Where wake2vec's train step spends its time, part by part, at a benchmark shape.

    python -m benchmarks.step_parts                    # TinyLlama's exact shape, 1 x 256 tokens
    python -m benchmarks.step_parts --part_shape=default --part_repeats=5

Each part is jitted on its own and timed in CPU-seconds (the process's, every thread
included), the median of `--part_repeats`, so that the figures add up on a shared machine
where wall time does not. The parts, in the order the step runs them:

* the body matmul at the shape (tokens x hidden @ hidden x MLP), 22 times in a `lax.scan`:
  once from one whole matrix, once from a stacked (layers, hidden, MLP) array sliced per
  iteration as the layer scan slices its weights: their difference is the cost of slicing;
* the body forward (embedding lookup, scanned layers, final norm);
* the body forward and backward to the table, per remat policy (the backward pass carries
  activation gradients only: the body is frozen);
* the head: the fused chunked cross-entropy with both of its gradients;
* the whole step per remat policy (benchmarks.benchmark's contender). The parts are
  compiled apart, so they need not add up to it exactly: inside the step XLA schedules and
  fuses across their boundaries, and the step adds the optimiser and the finite checks.

GFLOP per CPU-second is quoted against the float32 matmul rate measured in the same run
(benchmarks.benchmark.matmul_peak_flops), as the benchmark quotes MFU.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

from benchmarks import benchmark

_PART_SHAPE = flags.DEFINE_enum("part_shape", "tinyllama", list(benchmark.SHAPES), "Shape whose step is taken apart.")
_PART_REPEATS = flags.DEFINE_integer("part_repeats", 3, "Timed calls per part (after one untimed call).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 8, "Steps of the host-loop comparison (0 skips it).")


def cpu_seconds(fn, *args) -> float:
    """Median CPU-seconds of the jitted fn(*args) over --part_repeats calls, after one untimed call."""
    import jax

    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_PART_REPEATS.value):
        start = time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from wake2vec.models import model
    from wake2vec.training import train

    shape = benchmark.SHAPES[_PART_SHAPE.value]
    d, f, layers, tokens = shape["hidden"], shape["mlp"], shape["layers"], shape["batch"] * (shape["seq"] - 1)
    _, peak = benchmark.matmul_peak_flops()
    print(f"shape {_PART_SHAPE.value}: {shape}; float32 matmul peak measured now {peak / 1e9:.1f} GFLOP per CPU-second")

    def report(name, seconds, flops):
        rate = flops / seconds
        print(f"{name:52s} {seconds:7.3f} CPU-s  {rate / 1e9:6.1f} GFLOP/CPU-s ({rate / peak:.0%} of peak)", flush=True)

    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (tokens, d))
    stacked = 0.02 * jax.random.normal(key, (layers, d, f))
    matmul = 2 * tokens * d * f

    def layer(h, w):  # the carry keeps each iteration dependent on the last, as the layers are
        return jnp.tanh(h @ w)[:, :d], None

    def whole(x, ws):
        return jax.lax.scan(lambda h, _: layer(h, ws[0]), x, None, length=layers)[0]

    report(f"{layers} body matmuls in a scan, one whole matrix", cpu_seconds(whole, x, stacked), layers * matmul)
    report(f"{layers} body matmuls in a scan, sliced from the stack",
           cpu_seconds(lambda x, ws: jax.lax.scan(layer, x, ws)[0], x, stacked), layers * matmul)
    del stacked

    inputs = benchmark.wake2vec_inputs(shape)
    cfg, params = inputs["cfg"], {**inputs["frozen"], **inputs["trainable"]}
    ids = inputs["batch"][0]
    body, head, step = benchmark.step_flops_parts(shape)
    report("body forward", cpu_seconds(lambda p, i: model.hidden_states(cfg, p, i[:, :-1]).hidden, params, ids), body)
    for remat in ("none", "full"):
        def forward_backward(p, i, remat=remat):
            def total(table):
                return jnp.sum(model.hidden_states(cfg, {**p, "embedding": table}, i[:, :-1], remat=remat).hidden)
            return jax.grad(total)(p["embedding"])

        recompute = body if remat == "full" else 0
        report(f"body forward + backward to the table, remat={remat}",
               cpu_seconds(forward_backward, params, ids), 2 * body + recompute)

    hidden = jax.random.normal(key, (tokens, d))
    targets, weights = ids[:, 1:].reshape(-1), jnp.ones(tokens)
    table = params["embedding"]

    def head_grads(h, t):
        loss = lambda h, t: train.chunked_cross_entropy(h, t, targets, weights, cfg.vocab_size, 1024)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(h, t)

    report("head: chunked cross-entropy + both gradients", cpu_seconds(head_grads, hidden, table), head)
    for remat in ("none", "full"):
        run, _ = benchmark.wake2vec_step(inputs, remat)
        run()
        times = []
        for _ in range(_PART_REPEATS.value):
            start = time.process_time()
            run()
            times.append(time.process_time() - start)
        report(f"whole step, remat={remat} (model FLOPs)", statistics.median(times), step)
    if _LOOP_STEPS.value:
        host_loop_gap(inputs, _LOOP_STEPS.value)


def host_loop_gap(inputs: dict, steps: int) -> None:
    """The loop around the step, before and after the prefetch (wake2vec.training.loop):

    * serial, as the loop ran before: build batch k on the host, place it, wait for step k,
      read its loss and finiteness flag, then build batch k+1 (the device idles meanwhile);
    * pipelined, as it runs now: dispatch step k, place batch k+1 while it runs, read every
      step's figures at the end of the window in one transfer (step_window).

    Wall seconds per step, median of three passes: the gap is idle time, which CPU-seconds
    do not show. On a CPU the 'device' is the same cores, so the gap is small here; on an
    accelerator it is the host's whole batch and read-back time per step.
    """
    import jax
    import numpy as np

    from wake2vec.training import data, placement

    placed = inputs["placement"]
    _, step = benchmark.wake2vec_step(inputs, "none")  # the benchmark's compiled step; its own state is dropped
    accum, batch, seq = inputs["batch"].shape
    blocks = np.random.default_rng(0).integers(0, inputs["cfg"].vocab_size, (64, seq)).astype(np.int32)

    def put(k: int):
        return jax.device_put(data.train_batch(blocks, k, seed=0, batch_size=batch, grad_accum=accum),
                              placed.batch_sharding)

    def serial(state):
        for k in range(steps):
            state, metrics = jax.block_until_ready(step(state, placed.frozen, put(k)))
            float(metrics["loss"]), bool(metrics["finite"])
        return state

    def pipelined(state):
        pending, ids = [], put(0)
        for k in range(steps):
            state, metrics = step(state, placed.frozen, ids)
            ids = put(k + 1) if k + 1 < steps else None
            pending.append(metrics)
        jax.device_get(pending)
        return jax.block_until_ready(state)

    state = placement.initial_state(placed, inputs["tx"])
    for name, loop in (("serial (before)", serial), ("pipelined (now)", pipelined)):
        state = loop(state)  # warm
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            state = loop(state)
            walls.append((time.perf_counter() - start) / steps)
        print(f"host loop, {name:17s} {statistics.median(walls):7.3f} s/step wall over {steps} steps", flush=True)


if __name__ == "__main__":
    app.run(main)
