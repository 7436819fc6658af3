"""wake2vec.training.tboard, read back with TensorBoard's own event reader and Embedding Projector plugin.

TensorBoard is a test-only dependency: the files are written by tensorboardX and are valid
only if TensorBoard itself serves them as `tensorboard --logdir W` would.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.spatial.distance import cdist

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing import event_accumulator, plugin_event_multiplexer  # noqa: E402
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin  # noqa: E402
from werkzeug import test as werkzeug_test  # noqa: E402

from wake2vec.training import tboard, workdir as records  # noqa: E402


def read_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard's reader loads them (no sampling: size 0)."""
    accumulator = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected_scalars(events) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers at the float32 precision TensorBoard stores scalars in."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for tag, value in tboard.scalars_of(event):
            out.setdefault(tag, []).append((event["step"], float(np.float32(value))))
    return out


def fake_run(workdir, steps, start=0):
    """What the loop logs: a train event every step, an eval and a save every 2."""
    for step in range(start + 1, steps + 1):
        yield {"step": step, "train_loss": 5.0 / step, "lr": 1e-3 * step, "tokens_per_s": 100.0 + step, "step_s": 0.5}
        if step % 2 == 0:
            yield {"step": step, "val_loss": 6.0 / step, "eval_s": 0.25}
            yield {"step": step, "save_s": 0.125}


def test_scalars_mirror_metrics_and_a_resume_rebuilds_them_without_duplicates(tmp_path):
    first = [{"step": 0, "val_loss": 7.5, "eval_s": 1.0}, *fake_run(tmp_path, 5)]
    first[1]["compile_s"] = 3.0
    first[0].update({f"{who}_{unit}": 1.5 for who in ("val", "base", "delta") for unit in ("nats_per_char", "bits_per_byte")})
    writer = tboard.ScalarWriter(tmp_path, [])
    for event in first:
        records.append_metrics(tmp_path, event)
        writer.add(event)  # no close: the run is killed after step 5
    assert read_scalars(tmp_path / tboard.LOGDIR) == expected_scalars(first)
    assert set(read_scalars(tmp_path / tboard.LOGDIR)) == set(tboard.TAGS.values())

    # The resume restores step 4: steps 5.. are re-logged, step 5 with other numbers.
    records.truncate_metrics(tmp_path, 4)
    writer = tboard.ScalarWriter(tmp_path, records.read_metrics(tmp_path))
    for event in fake_run(tmp_path, 8, start=4):
        if "step_s" in event:
            event["step_s"] = 0.75
        records.append_metrics(tmp_path, event)
        writer.add(event)
    writer.close()
    shown = read_scalars(tmp_path / tboard.LOGDIR)
    assert shown == expected_scalars(records.read_metrics(tmp_path))
    assert [step for step, _ in shown["time/step_s"]] == list(range(1, 9))  # each step once
    assert dict(shown["time/step_s"])[5] == 0.75


def test_unknown_numeric_fields_are_kept_and_the_rest_skipped():
    event = {"step": 3, "val_loss": 1.5, "grad_norm": 2, "note": "text", "flag": True}
    assert tboard.scalars_of(event) == [("loss/val", 1.5), ("metrics/grad_norm", 2.0)]


def _serve(plugin, route, **query):
    client = werkzeug_test.Client(plugin.get_plugin_apps()[route])
    response = client.get(route, query_string=query)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data()


def test_projector_files_are_served_by_tensorboards_projector(tmp_path):
    rng = np.random.default_rng(0)
    base, rows, dims = 150, 230, 12
    table = rng.standard_normal((rows, dims)).astype(np.float32)
    table[7] = 0.0  # a zero row: its cosine with anything is 0, and it must not crash
    tokens = [f"▁w{i}" for i in range(rows)]
    tokens[3], tokens[200], tokens[201] = "tab\there", "new\nline", None
    workdir = tmp_path / "W"
    tboard.ScalarWriter(workdir, [{"step": 1, "train_loss": 2.0}]).close()  # a run, as the loop leaves it
    tboard.write_projector(workdir / tboard.LOGDIR, table, base, tokens, name='step "6" table')

    # As `tensorboard --logdir W` loads it: the multiplexer finds the run, the plugin its config.
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(workdir))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(workdir))
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(workdir), data_provider=provider))
    assert json.loads(_serve(plugin, "/runs")) == [tboard.LOGDIR]
    info = json.loads(_serve(plugin, "/info", run=tboard.LOGDIR))
    (embedding,) = info["embeddings"]
    assert embedding["tensorName"] == "step '6' table" and embedding["tensorShape"] == [rows, dims]
    served = np.frombuffer(_serve(plugin, "/tensor", run=tboard.LOGDIR, name=embedding["tensorName"]), np.float32)
    np.testing.assert_array_equal(served.reshape(rows, dims), table)

    tsv = _serve(plugin, "/metadata", run=tboard.LOGDIR, name=embedding["tensorName"]).decode("utf-8")
    header, *cells = list(csv.reader(tsv.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert header == ["token", "kind", "norm", "nearest_base", "nearest_base_cosine"]
    assert len(cells) == rows and all(len(row) == 5 for row in cells)
    assert [row[0] for row in cells[:4]] == ["▁w0", "▁w1", "▁w2", "tab\\there"]
    assert cells[200][0] == "new\\nline" and cells[201][0] == "<id 201>"
    assert [row[1] for row in cells] == ["base"] * base + ["new"] * (rows - base)
    np.testing.assert_allclose([float(row[2]) for row in cells], np.linalg.norm(table, axis=1), atol=5e-5)  # 4 decimals

    # scipy's cosine distances, float64, a base row never its own neighbour.
    similarity = 1.0 - cdist(table.astype(np.float64), table[:base].astype(np.float64), "cosine")
    similarity[np.isnan(similarity)] = 0.0  # the zero row: scipy's 0/0; ours defines it as 0
    similarity[np.arange(base), np.arange(base)] = -np.inf
    names = [row[0] for row in cells]
    # Ties go to the lowest index in both; the zero row's scores are all 0, a tie at index 0 (or 1 for row 0).
    assert [row[3] for row in cells] == [names[j] for j in similarity.argmax(axis=1)]
    np.testing.assert_allclose([float(row[4]) for row in cells], similarity.max(axis=1), atol=5e-5)


def test_nearest_base_neighbours_refuses_a_base_without_neighbours():
    with pytest.raises(ValueError, match="base_size=1"):
        tboard.nearest_base_neighbours(np.ones((4, 3), np.float32), 1)
