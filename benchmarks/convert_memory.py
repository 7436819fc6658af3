"""Peak host memory of convert.load_hf on a TinyLlama-shaped random checkpoint.

    python -m benchmarks.convert_memory [--dir=/tmp/tinyllama_shape] [--keep]

Writes a random fp32 checkpoint with TinyLlama-1.1B's shapes (22 layers, hidden 2048,
MLP 5632, 32 heads, 4 KV heads, vocab 32,000, untied), then loads it in a fresh
subprocess and reports that process's peak RSS against the weights' size. The baseline
(the interpreter with jax imported, before loading) is reported too, so the ratio can be
read both ways.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/wake2vec_tinyllama_shape", "where the random checkpoint is written")
_KEEP = flags.DEFINE_bool("keep", False, "keep the checkpoint afterwards")

TINYLLAMA_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
)

# VmHWM is the high-water mark of this process's own address space: unlike ru_maxrss it
# does not inherit the parent's peak across fork + exec.
_CHILD = """
import sys, time
import jax
from wake2vec.models import convert
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
base = hwm()
t = time.perf_counter()
cfg, params = convert.load_hf(sys.argv[1])
jax.block_until_ready(params)
print(base, hwm(), time.perf_counter() - t)
"""


def write_random_checkpoint(directory: pathlib.Path, dtype: str = "float32") -> int:
    """A seeded random HF checkpoint at TinyLlama-1.1B's shape, its tensors stored as `dtype`."""
    import numpy as np

    from wake2vec.models import convert
    from wake2vec.config import ModelConfig, dtype_from_name

    cfg = ModelConfig(**TINYLLAMA_SHAPE)
    rng = np.random.default_rng(0)
    shapes = convert._expected_shapes(cfg)
    store = dtype_from_name(dtype)
    tensors = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(store) for name, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    convert.write_safetensors(directory / "model.safetensors", tensors)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype)))
    return sum(t.nbytes for t in tensors.values())  # the tensors are freed on return, before the child starts


def main(argv):
    del argv
    directory = pathlib.Path(_DIR.value)
    weight_bytes = write_random_checkpoint(directory)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(directory)], check=True, capture_output=True, text=True)
    base, peak, seconds = out.stdout.split()
    base, peak = int(base), int(peak)
    gb = 1e9
    print(f"weights {weight_bytes / gb:.2f} GB; load_hf peak RSS {peak / gb:.2f} GB "
          f"({peak / weight_bytes:.2f}x the weights; {(peak - base) / weight_bytes:.2f}x above the "
          f"{base / gb:.2f} GB interpreter baseline); {float(seconds):.1f} s")
    if not _KEEP.value:
        shutil.rmtree(directory)


if __name__ == "__main__":
    app.run(main)
