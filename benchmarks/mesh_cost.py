"""Per-device FLOPs and memory of the compiled Phase 1 step, per mesh, from abstract shapes.

    python -m benchmarks.mesh_cost --shape=llama-3.1-8b --devices=16 --meshes=16,1 8,2 2,8
    python -m benchmarks.mesh_cost --shape=tinyllama --meshes=8,1 4,2 2,4

Nothing is allocated: the step is lowered from jax.ShapeDtypeStruct inputs that carry the
run's shardings (the ones wake2vec.training.loop uses) and compiled for `--devices` forced host
devices; XLA's `cost_analysis()` (FLOPs) and `memory_analysis()` (argument, output, temp
bytes) of the SPMD-partitioned program are per device. So an 8B body and its 172,451-row
table are sized on a 2-core machine in a minute. Memory figures are the CPU backend's
buffer assignment: an accelerator's compiler fuses and schedules differently, so treat
them as an estimate of the same program, not as a measurement of a GPU or TPU.

Prints one JSON object per line: {"mesh", "flops_per_device", "argument_bytes",
"output_bytes", "temp_bytes", "alias_bytes", "peak_bytes"}; `--out` also writes them all
to a JSON file. XLA_FLAGS is set here, before jax starts, so run it as its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def _force_devices(argv) -> None:
    count = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"


# The shapes that matter: the study's TinyLlama, the Llama-3.1-8B with the Wake
# lexicon (128,256 base + 44,195 coinages = 172,451 rows), and a tiny one for the tests.
SHAPES = {
    "tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2),
    "tinyllama": dict(vocab_size=76_500, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    "llama-3.1-8b": dict(vocab_size=172_451, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500_000.0,
                         max_position_embeddings=131_072),
}
BASE_VOCAB = {"tiny": 800, "tinyllama": 32_000, "llama-3.1-8b": 128_256}


def analyse(shape: str, mesh_spec: str, *, batch_size: int, grad_accum: int, seq_len: int,
            frozen_dtype: str, compute_dtype: str, loss_chunk: int) -> dict:
    """Compiles one step for `mesh_spec` and returns its per-device cost and memory."""
    import jax

    from wake2vec.models import model
    from wake2vec.training import optim, parallel, train
    from wake2vec.config import ModelConfig, TrainConfig, dtype_from_name

    cfg = ModelConfig(**SHAPES[shape], tie_word_embeddings=True)
    tc = TrainConfig(max_steps=100, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len,
                     frozen_dtype=frozen_dtype, compute_dtype=compute_dtype, loss_chunk=loss_chunk)
    mesh = parallel.make_mesh(mesh_spec)
    rows = parallel.padded_vocab(cfg.vocab_size, mesh)
    # The table's rows as a run pads them; the body in --frozen_dtype, the table fp32.
    params = jax.eval_shape(lambda: model.init_params(cfg.replace(vocab_size=rows), jax.random.PRNGKey(0),
                                                      dtype_from_name(frozen_dtype)))
    params["embedding"] = jax.ShapeDtypeStruct(params["embedding"].shape, jax.numpy.float32)
    trainable, frozen = optim.split_params(params)
    tx = optim.make_optimizer(tc, BASE_VOCAB[shape])
    abstract = jax.eval_shape(lambda t, f: train.init_state(t, f, tx), trainable, frozen)
    state_sharding = parallel.state_sharding(abstract, mesh, rows)
    frozen_sharding = parallel.frozen_sharding(frozen, mesh)
    placed = lambda tree, shardings: jax.tree_util.tree_map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
    batch = jax.ShapeDtypeStruct((grad_accum, batch_size, seq_len + 1), jax.numpy.int32,
                                 sharding=parallel.batch_sharding(mesh, 3, 1))
    settings = train.StepSettings(cfg, dtype_from_name(compute_dtype), "full", loss_chunk)
    step = parallel.jit_train_step(train.make_train_step(tx, optim.make_schedule(tc), settings),
                                   mesh, state_sharding, frozen_sharding)
    with jax.set_mesh(mesh):
        compiled = step.lower(placed(abstract, state_sharding), placed(frozen, frozen_sharding), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    out = {
        "shape": shape,
        "mesh": mesh_spec,
        "flops_per_device": float(cost["flops"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }
    # The donated state is both an argument and an output: count it once.
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--devices", type=int, default=8, help="forced host devices")
    parser.add_argument("--meshes", nargs="+", default=["8,1", "4,2", "2,4"])
    parser.add_argument("--batch_size", type=int, default=16, help="blocks per microbatch (global)")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--frozen_dtype", default="bfloat16")
    parser.add_argument("--compute_dtype", default="bfloat16")
    parser.add_argument("--loss_chunk", type=int, default=1024)
    parser.add_argument("--out", type=pathlib.Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    results = []
    for spec in args.meshes:
        result = analyse(args.shape, spec, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         seq_len=args.seq_len, frozen_dtype=args.frozen_dtype,
                         compute_dtype=args.compute_dtype, loss_chunk=args.loss_chunk)
        result.update(devices=args.devices, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      seq_len=args.seq_len, frozen_dtype=args.frozen_dtype, compute_dtype=args.compute_dtype)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    _force_devices(sys.argv[1:])
    main()
