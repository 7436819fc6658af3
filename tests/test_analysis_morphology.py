"""analysis.morphology: consistency and separation on tables where they are known exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wake2vec.phases.alignment import AlignmentData
from wake2vec.analysis import morphology, report
from wake2vec.phases.groups import pack_pieces

E = np.eye(4)


def one_piece(*ids: int):
    pieces = pack_pieces([[i] for i in ids])
    return pieces.ids, pieces.mask


def test_parallel_offsets_are_exactly_consistent():
    # Group 0: offsets e0, 2 e0 (parallel); group 1: e1 (alone, its own mean).
    table = np.stack([np.zeros(4), E[3], E[2], E[0], 2 * E[0] + E[3], E[1] + E[2]])
    got = morphology.morpheme_consistency(table, one_piece(3, 4, 5), one_piece(0, 1, 2), [0, 0, 1], 2)
    assert got["per_group"] == pytest.approx([1.0, 1.0])
    assert got["mean_over_pairs"] == pytest.approx(1.0) and got["mean_over_groups"] == pytest.approx(1.0)
    assert got["pairs_per_group"] == [2, 1]


def test_two_against_one_gives_a_third():
    # Offsets e0, e0, -e0: mu = e0 / 3, cosines 1, 1, -1; a third group with no pair is None.
    table = np.stack([np.zeros(4), E[0], -E[0]])
    got = morphology.morpheme_consistency(table, one_piece(1, 1, 2), one_piece(0, 0, 0), [0, 0, 0], 2)
    assert got["per_group"][0] == pytest.approx(1 / 3) and got["per_group"][1] is None
    assert got["mean_over_groups"] == pytest.approx(1 / 3)


def test_orthogonal_groups_separate_perfectly():
    # Group 0 at e0 (twice), group 1 at e1 (twice): intra 1, inter 0, silhouette 1.
    table = np.stack([E[0], 3 * E[0], E[1], E[1]])
    got = morphology.device_separation(table, one_piece(0, 1, 2, 3), [0, 0, 1, 1])
    assert (got["intra"], got["inter"], got["separation"]) == pytest.approx((1.0, 0.0, 1.0))
    assert got["silhouette"] == pytest.approx(1.0)
    assert [g["separation"] for g in got["per_group"]] == pytest.approx([1.0, 1.0])


def test_separation_with_known_cosines_and_a_singleton():
    # Group 0: e0 and (e0 + e1)/sqrt2 (cos 1/sqrt2); group 1: e1 alone (no intra pair).
    # Inter pairs from group 0: cos(e0, e1) = 0, cos((e0+e1)/sqrt2, e1) = 1/sqrt2.
    s = 1 / np.sqrt(2)
    table = np.stack([E[0], (E[0] + E[1]) * s, E[1]])
    got = morphology.device_separation(table, one_piece(0, 1, 2), [0, 0, 1])
    group0, group1 = got["per_group"]
    assert group0["intra"] == pytest.approx(s) and group0["inter"] == pytest.approx(s / 2)
    assert group1["intra"] is None and group1["separation"] is None and group1["inter"] == pytest.approx(s / 2)
    assert got["intra"] == pytest.approx(s) and got["inter"] == pytest.approx(s / 2)
    # One group only: no inter pair, no silhouette.
    alone = morphology.device_separation(table, one_piece(0, 1), [0, 0])
    assert alone["inter"] is None and alone["separation"] is None and alone["silhouette"] is None


def _groups_and_tables():
    """Base rows 0-3, Wake rows 4-9. Before: random; after: offsets of group 0 all e0, devices apart."""
    rng = np.random.default_rng(0)
    pre = rng.standard_normal((12, 6)).astype(np.float32)
    post = pre.copy()
    post[4:7] = pre[0:3] + np.eye(6, dtype=np.float32)[0]  # words 4-6 = bases 0-2 + e0
    post[7:10] = np.eye(6, dtype=np.float32)[[1, 2, 2]] * [[1], [1], [5]]
    data = AlignmentData(
        morph_words=pack_pieces([[4], [5], [6]]), morph_bases=pack_pieces([[0], [1], [2]]),
        morph_group=np.zeros(3, np.int32), device_words=pack_pieces([[7], [8], [9], [4]]),
        device=np.array([0, 1, 1, 0], np.int32), wake_ids=np.arange(4, 10, dtype=np.int32),
        mu=np.float32(1), sigma=np.float32(1), num_groups=1)
    return pre, post, data


def test_report_adds_the_section_and_figure_only_with_groups(tmp_path):
    pre, post, data = _groups_and_tables()
    names = {"morph": ["suffix s"], "device": ["pun", "nonce"]}
    summary = report.run_analysis(post, 4, tmp_path, E_pre=pre, groups=data, group_names=names)
    section = summary["morphology"]
    assert section["morph_groups"] == ["suffix s"] and section["device_groups"] == ["pun", "nonce"]
    assert section["post"]["consistency"]["per_group"] == pytest.approx([1.0])
    assert section["pre"]["consistency"]["per_group"][0] < 0.99
    assert section["post"]["device"]["per_group"][1]["intra"] == pytest.approx(1.0)
    assert (tmp_path / report.MORPHOLOGY_FIGURE_FILENAME).stat().st_size > 0
    on_disk = json.loads((tmp_path / report.SUMMARY_FILENAME).read_text(encoding="utf-8"))
    assert on_disk["morphology"] == section
    assert report.analyze(post, 4, E_pre=pre, groups=data, group_names=names)["morphology"] == section

    plain = report.run_analysis(post, 4, tmp_path / "plain", E_pre=pre)
    assert "morphology" not in plain and not (tmp_path / "plain" / report.MORPHOLOGY_FIGURE_FILENAME).exists()


def test_device_words_beyond_the_cap_are_subsampled_the_same_for_both_tables(monkeypatch):
    pre, post, data = _groups_and_tables()
    monkeypatch.setattr(morphology, "MAX_DEVICE_WORDS", 3)
    rng = np.random.default_rng(5)
    section, figure = morphology.section(post, data, rng, E_pre=pre)
    assert section["device_words_measured"] == 3 and section["device_words"] == 4
    assert section["morph_groups"] == ["0"] and set(figure.separation) == {"pre", "post"}
