"""TensorBoard views of a run: metrics.jsonl as scalars, the trained table in the Embedding Projector.

    tensorboard --logdir W            # W/tensorboard: scalars, and the projector once a table is exported

Both live in W/tensorboard/, one "run" for TensorBoard:

* **Scalars.** Every numeric field of every metrics.jsonl event (losses, lr, tokens/s, the
  step, eval, save and compile times) is also a TensorBoard scalar at the event's step,
  written as the event is appended. metrics.jsonl stays the record: on every (re)start the
  event files are rebuilt from it, after it has been cut back to the restored checkpoint,
  so a resumed run shows each step once, never the killed run's steps beyond its
  checkpoint. TensorBoard's own reader sees exactly the JSON values, rounded to float32.
* **Projector.** `write_projector` writes the (vocab, D) table as raw little-endian
  float32 (the projector's binary tensor format: a TSV of 76,500 x 2,048 numbers would be
  1.5 GB), metadata.tsv with one row per token (the token, base or new, its L2 norm, its
  nearest base-vocabulary neighbour by cosine and that cosine) and projector_config.pbtxt
  tying them together, so a researcher can search a Wake word and fly to its English
  neighbours.

The writer is tensorboardX, which needs no TensorFlow; the tests read everything back with
TensorBoard's own event reader and projector plugin.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.training import workdir as records

LOGDIR = "tensorboard"
PROJECTOR_CONFIG = "projector_config.pbtxt"  # the name TensorBoard's projector plugin looks for
PROJECTOR_TENSOR = "embeddings.bin"
PROJECTOR_METADATA = "metadata.tsv"

# metrics.jsonl field -> TensorBoard tag; fields not listed go under "metrics/".
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "optimizer/lr",
    "tokens_per_s": "throughput/tokens_per_s",
    "step_s": "time/step_s",
    "eval_s": "time/eval_s",
    "save_s": "time/save_s",
    "compile_s": "time/compile_s",
    # Against the base model (wake2vec.phases.base_cost): the run, the base and the headline difference.
    **{f"{who}_{unit}": f"vs_base/{who}_{unit}" for who in ("val", "base", "delta") for unit in ("nats_per_char", "bits_per_byte")},
}


def _tensorboardx():
    """tensorboardX's synchronous event-file writer and protos, imported without torch.

    tensorboardX imports torch whenever it is installed (Colab ships it) only to accept
    torch tensors, which costs ~5 s per launch; hiding it for the import makes tensorboardX
    fall back to numpy. A torch that is already imported is left alone.
    """
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2
    finally:
        if hidden:
            del sys.modules["torch"]
    return EventsWriter, event_pb2, summary_pb2


def scalars_of(event: dict) -> list[tuple[str, float]]:
    """(tag, value) for every numeric field of one metrics event but its step."""
    return [(TAGS.get(name, f"metrics/{name}"), float(value)) for name, value in event.items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)]


class ScalarWriter:
    """Mirrors metrics.jsonl into W/tensorboard as events are appended.

    Construction rebuilds the event file from `history` (the events already in
    metrics.jsonl, cut back to the restored checkpoint), so what TensorBoard shows is always
    what metrics.jsonl says; TensorBoard cannot delete points, hence a rebuild rather than
    an append on resume. The writer is tensorboardX's synchronous one (its SummaryWriter
    queues events on a thread, and its flush does not wait for the queue), so an event is
    on disk when `add` returns.
    """

    def __init__(self, workdir: pathlib.Path, history: Sequence[dict]):
        logdir = pathlib.Path(workdir) / LOGDIR
        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("events.out.tfevents.*"):
            old.unlink()
        events_writer, self._event_pb2, self._summary_pb2 = _tensorboardx()
        self._writer = events_writer(str(logdir / "events"))
        for event in history:
            self._write(event)
        self._writer.flush()

    def _write(self, event: dict) -> None:
        values = [self._summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars_of(event)]
        if values:
            self._writer.write_event(self._event_pb2.Event(
                wall_time=time.time(), step=int(event["step"]), summary=self._summary_pb2.Summary(value=values)))

    def add(self, event: dict) -> None:
        """Writes one event's scalars and flushes, so a kill loses nothing already logged."""
        self._write(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# ---------------------------------------------------------------------------- projector


@jax.jit
def _nearest_base_chunk(queries: jax.Array, base_units: jax.Array, query_ids: jax.Array):
    """Per query row: the index and cosine of its most similar base row, itself excluded."""
    norms = jnp.linalg.norm(queries, axis=1, keepdims=True)
    scores = (queries / jnp.where(norms > 0, norms, 1.0)) @ base_units.T
    own = query_ids[:, None] == jnp.arange(base_units.shape[0])[None, :]
    scores = jnp.where(own, -jnp.inf, scores)
    best = jnp.argmax(scores, axis=1)
    return best, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


def nearest_base_neighbours(table: np.ndarray, base_size: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each row's nearest base row by cosine, a base row never its own.

    float32 matmuls in fixed-size chunks on the default device (a T4 does TinyLlama's
    76,500 x 32,000 x 2,048 in seconds; two CPU cores take minutes). A float32 cosine can
    rank two neighbours within ~1e-7 of each other differently from float64; for a label in
    a viewer that is immaterial. Ties go to the lower index (argmax).
    """
    if not 1 < base_size <= table.shape[0]:
        raise ValueError(f"base_size={base_size} must be in (1, {table.shape[0]}]: the base rows need a neighbour")
    table32 = jnp.asarray(table, jnp.float32)
    base_norms = jnp.linalg.norm(table32[:base_size], axis=1, keepdims=True)
    base_units = table32[:base_size] / jnp.where(base_norms > 0, base_norms, 1.0)
    padded = -(-table.shape[0] // chunk) * chunk  # one compiled shape: the last chunk is padded
    rows = jnp.pad(table32, ((0, padded - table.shape[0]), (0, 0)))
    index, cosine = [], []
    for start in range(0, padded, chunk):
        best, score = _nearest_base_chunk(rows[start:start + chunk], base_units, jnp.arange(start, start + chunk))
        index.append(np.asarray(best))
        cosine.append(np.asarray(score))
    return np.concatenate(index)[: table.shape[0]], np.concatenate(cosine)[: table.shape[0]]


def _tsv_cell(text: str) -> str:
    """A token as one TSV cell: tabs, newlines and backslashes escaped, nothing lost to the eye."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_projector(logdir: pathlib.Path, table: np.ndarray, base_size: int, tokens: Sequence[str | None], *,
                    name: str = "embedding table") -> pathlib.Path:
    """Writes the Embedding Projector's files for `table` into `logdir`; returns the config's path.

    `tokens[i]` names row i (None: no token, shown as <id i>). Rows [:base_size] are the base
    vocabulary. The files are written under temporary names and renamed, the config last, so
    TensorBoard never reads a half-written tensor.
    """
    table = np.asarray(table)
    if table.ndim != 2 or len(tokens) != table.shape[0]:
        raise ValueError(f"table of shape {table.shape} and {len(tokens)} token names: need one name per row")
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    names = [f"<id {i}>" if token is None else token for i, token in enumerate(tokens)]
    norms = np.linalg.norm(table.astype(np.float64), axis=1)
    neighbour, cosine = nearest_base_neighbours(table, base_size)
    lines = ["token\tkind\tnorm\tnearest_base\tnearest_base_cosine"]
    lines += [f"{_tsv_cell(names[i])}\t{'base' if i < base_size else 'new'}\t{norms[i]:.4f}\t"
              f"{_tsv_cell(names[neighbour[i]])}\t{cosine[i]:.4f}" for i in range(table.shape[0])]
    records.atomic_write_text(logdir / PROJECTOR_METADATA, "\n".join(lines) + "\n")
    tmp = logdir / (PROJECTOR_TENSOR + ".tmp")
    table.astype("<f4").tofile(tmp)
    os.replace(tmp, logdir / PROJECTOR_TENSOR)
    config = "\n".join([
        "embeddings {",
        f'  tensor_name: "{name.replace(chr(34), chr(39))}"',  # no double quote can end the string early
        f'  tensor_path: "{PROJECTOR_TENSOR}"',
        f'  metadata_path: "{PROJECTOR_METADATA}"',
        f"  tensor_shape: {table.shape[0]}",
        f"  tensor_shape: {table.shape[1]}",
        "}",
    ])
    records.atomic_write_text(logdir / PROJECTOR_CONFIG, config + "\n")
    return logdir / PROJECTOR_CONFIG
