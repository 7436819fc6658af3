"""Runs the Phase 1 step on several meshes of 8 forced host devices; prints the differences.

The batch is split over every device and the frozen body is sharded over every device
(gathered a layer at a time), so this also checks that those gathers change nothing.

With format names as arguments (`python -m tests.mesh_equivalence int8 nf4`) it runs the
same step with the body quantized (wake2vec.models.quant) instead, on one device and on 4,2,
for tests/test_quant.py: the compressed leaves are sharded and gathered like any other.
With `lora` it runs Phase 2's step (adapters trainable, dropout on; body, table and head
frozen, the table sharded on its vocabulary axis) on one device and on 4,2, for
tests/test_phases.py.

Run as a subprocess by tests/test_parallel.py, because XLA_FLAGS must be set before jax
initialises its backends and the rest of the suite runs on one device.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from wake2vec.models import lora, model, padding, quant  # noqa: E402
from wake2vec.training import optim, parallel, train  # noqa: E402
from wake2vec.config import ModelConfig, Phase2Config, TrainConfig  # noqa: E402

CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
TC = TrainConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0, weight_decay=0.01, mask_base_rows=True)


def run(mesh_spec: str, devices, fmt: str | None = None, adapters: bool = False) -> tuple[list[float], np.ndarray, np.ndarray]:
    mesh = parallel.make_mesh(mesh_spec, devices)
    rows = parallel.padded_vocab(CFG.vocab_size, mesh)
    params = model.init_params(CFG, jax.random.PRNGKey(0))
    params.update(padding.pad(optim.split_params(params)[0], rows))
    trainable, frozen = optim.split_params(params)
    if fmt is not None:
        frozen = quant.quantize_body(jax.tree_util.tree_map(np.asarray, frozen), fmt)
    tx = optim.make_optimizer(TC, 200, CFG.vocab_size)
    settings = train.StepSettings(CFG, loss_chunk=64)
    if adapters:
        spec = lora.LoraSpec(dropout=0.1)
        ab = lora.init_adapters(CFG, spec, jax.random.PRNGKey(1))
        # A non-zero B, so the adapters shape the loss from the first step.
        ab = jax.tree_util.tree_map_with_path(
            lambda path, x: 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape) if path[-1].key == "b" else x, ab)
        frozen, trainable = {**frozen, **trainable}, {"lora": ab}
        tx = optim.make_optimizer(Phase2Config(max_steps=10, lr=1e-2, warmup_ratio=0.0), 200, CFG.vocab_size,
                                  trainable_keys=("lora",))
        settings = train.StepSettings(CFG, loss_chunk=64, lora=spec, seed=3)
    state = train.init_state(trainable, frozen, tx)
    # The shardings and the jitted step of a real run (wake2vec.training.loop builds them the same way).
    state_sharding = parallel.state_sharding(state, mesh, rows)
    frozen_sharding = parallel.frozen_sharding(frozen, mesh, rows)
    batch_sharding = parallel.batch_sharding(mesh, 3, 1)
    state = jax.device_put(state, state_sharding)
    frozen = jax.device_put(frozen, frozen_sharding)
    step = parallel.jit_train_step(train.make_train_step(tx, optim.make_schedule(TC), settings),
                                   mesh, state_sharding, frozen_sharding)
    losses = []
    for seed in range(3):
        batch = np.random.default_rng(seed).integers(0, 300, (2, 8, 33)).astype(np.int32)
        with jax.set_mesh(mesh):  # traced with the mesh in context, as wake2vec.training.loop lowers it
            state, metrics = step(state, frozen, jax.device_put(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    table = (frozen if adapters else state.trainable)["embedding"]
    assert table.sharding.spec == jax.sharding.PartitionSpec("model", None)
    if len(devices) > 1 and fmt is not None:
        # The layer gathers move the compressed leaves (int8 / uint8), not dequantized floats.
        with jax.set_mesh(mesh):
            hlo = step.lower(state, frozen, jax.device_put(batch, batch_sharding)).compile().as_text()
        gathered = set(re.findall(r"= (\w+)\[[\d,]*\](?:\{[^}]*\})? all-gather\(", hlo))
        assert {"int8": "s8", "nf4": "u8"}[fmt] in gathered, gathered
    if len(devices) > 1:
        # Every stacked layer matrix is split over all the devices: no device holds the body.
        for leaf in jax.tree_util.tree_leaves(frozen["layers"]):
            if leaf.ndim >= 3:
                assert leaf.addressable_shards[0].data.size * len(devices) == leaf.size, leaf.sharding
    if adapters:  # the trained adapters stand where the table and head would
        leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(state.trainable["lora"])]
        return losses, np.concatenate(leaves), np.zeros(1)
    real = padding.unpad(jax.tree_util.tree_map(np.asarray, state.trainable), CFG.vocab_size)
    return losses, real["embedding"], real["lm_head"]["kernel"]


def compare(ref, other) -> dict:
    (ref_losses, ref_table, ref_head), (losses, table, head) = ref, other
    return {
        "loss": float(np.max(np.abs(np.subtract(losses, ref_losses)))),
        "table": float(np.max(np.abs(table - ref_table))),
        "head": float(np.max(np.abs(head - ref_head))),
    }


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    formats = sys.argv[1:]
    if formats == ["lora"]:
        print(json.dumps({"4,2": compare(run("1,1", devices[:1], adapters=True), run("4,2", devices, adapters=True))}))
        return
    if formats:
        print(json.dumps({fmt: compare(run("1,1", devices[:1], fmt), run("4,2", devices, fmt)) for fmt in formats}))
        return
    reference = run("1,1", devices[:1])
    print(json.dumps({spec: compare(reference, run(spec, devices)) for spec in ("8,1", "4,2", "2,4")}))


if __name__ == "__main__":
    main()
