"""wake2vec.phases.groups and experiments.build_groups: group files, affix groups, running-text pieces."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from experiments import build_groups
from wake2vec.phases import alignment, groups
from wake2vec import launcher
from wake2vec.tokens import vocab
from wake2vec.training.data import tokenizers_backend
from tests.conftest import SHARED_DATA
from wake2vec.phases.groups import DeviceGroup, GroupFileError, MorphemeGroup


def write_lines(tmp_path, *lines: str, name: str = "groups.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


ING = MorphemeGroup("ing", "suffix", ("speeching", "togethering", "insighting"), ("speech", "together", "insight"))


def test_morpheme_groups_round_trip_and_small_groups_are_dropped(tmp_path, caplog):
    small = MorphemeGroup("un", "prefix", ("unmanner", "unstrict"), ("manner", "strict"))
    path = tmp_path / "out" / "groups.jsonl"
    groups.write_groups(path, [ING, small])
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"morpheme": "ing", "morpheme_type": "suffix", "examples": list(ING.examples),
                                    "bases": list(ING.bases), "n_examples": 3}
    with caplog.at_level(logging.INFO):
        assert groups.read_morpheme_groups(path) == [ING]
    assert "1 under 3 pairs dropped" in caplog.text
    assert groups.read_morpheme_groups(path, min_pairs=2) == [ING, small]


def test_device_groups_round_trip_with_blank_lines_and_nfc(tmp_path):
    path = write_lines(tmp_path, json.dumps({"device": "portmanteau", "examples": ["chaosmos", "meandertale"]}), "",
                       json.dumps({"device": "foreign", "examples": ["Bre\u0301kkek"]}))
    assert groups.read_device_groups(path) == [DeviceGroup("portmanteau", ("chaosmos", "meandertale")),
                                               DeviceGroup("foreign", ("Br\u00e9kkek",))]


GOOD = json.dumps({"morpheme": "s", "morpheme_type": "suffix", "examples": ["as", "bs", "cs"], "bases": ["a", "b", "c"]})


@pytest.mark.parametrize("bad, message", [
    ('{"morpheme": "s",', "not valid JSON"),
    ('["s"]', "expected a JSON object, got list"),
    ('{"morpheme_type": "suffix", "examples": ["xs"], "bases": ["x"]}', "missing field 'morpheme'"),
    ('{"morpheme": "s", "morpheme_type": "suffix", "bases": ["x"]}', "missing field 'examples'"),
    ('{"morpheme": "s", "morpheme_type": "suffix", "examples": ["xs", "ys"], "bases": ["x"]}',
     "2 examples but 1 bases"),
    ('{"morpheme": "s", "morpheme_type": "circumfix", "examples": ["xs"], "bases": ["x"]}',
     "morpheme_type 'circumfix' is not one of prefix, suffix, infix"),
    ('{"morpheme": "s", "morpheme_type": "suffix", "examples": ["xs"], "bases": ["x"], "n_examples": 4}',
     "n_examples is 4 but there are 1 examples"),
    ('{"morpheme": "s", "morpheme_type": "suffix", "examples": ["x s"], "bases": ["x"]}', "which is not one word"),
])
def test_morpheme_file_errors_name_the_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path, GOOD, "", bad)
    with pytest.raises(GroupFileError) as error:
        groups.read_morpheme_groups(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_device_file_errors_name_the_file_and_line(tmp_path):
    path = write_lines(tmp_path, '{"device": "pun", "examples": []}')
    with pytest.raises(GroupFileError, match=rf"^{path}:1: 'examples' must be a non-empty list of words$"):
        groups.read_device_groups(path)
    with pytest.raises(GroupFileError, match="group file .* does not exist"):
        groups.read_device_groups(tmp_path / "missing.jsonl")


def test_affix_groups_are_plain_concatenations_with_whole_word_stems():
    lexicon = ["speeching", "togethering", "insighting", "making", "heing", "unthanks", "unmanner",
               "rethanks", "speeching", "thanksy"]
    base = {"speech", "together", "insight", "make", "he", "thanks", "manner"}
    found = groups.build_affix_groups(lexicon, base, min_pairs=1)
    # One group per affix, in the order of groups.AFFIXES (s, ed, ing, y, un, re).
    assert [(g.morpheme_type, g.morpheme) for g in found] == [("suffix", "ing"), ("suffix", "y"),
                                                            ("prefix", "un"), ("prefix", "re")]
    by_name = {(g.morpheme_type, g.morpheme): g for g in found}
    # "making" is not make + ing (no spelling rules); "heing"'s stem "he" is under min_stem.
    assert by_name[("suffix", "ing")] == ING
    assert by_name[("prefix", "un")].bases == ("thanks", "manner")
    assert groups.build_affix_groups(lexicon, base) == [ING]  # min_pairs=3
    counts = groups.affix_counts(lexicon, found)
    assert counts == {"groups": 4, "pairs": 7, "pairs_per_group": {"suffix ing": 3, "suffix y": 1, "prefix un": 2,
                                                                   "prefix re": 1},
                      "words_matched": 7, "words_unmatched": 2}


@pytest.fixture
def llama(shared_data):
    return vocab.load_base_tokenizer(shared_data / "tinyllama_tokenizer")


@pytest.fixture(scope="module")
def whole_word_injected():
    """(tokenizer, stats): the lexicon injected whole-word into Llama 2, once for the module."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA}")
    base = vocab.load_base_tokenizer(SHARED_DATA / "tinyllama_tokenizer")
    injected, stats, _ = vocab.inject(base, vocab.load_lexicon(SHARED_DATA / "wake_lexicon.txt"), "whole_word", "")
    return injected, stats


def test_base_whole_words_are_marked_word_tokens(llama):
    words = groups.base_whole_words(llama)
    assert {"house", "river", "speech", "together"} <= words
    assert "ouses" not in words and "." not in words  # no marker; not a word


def test_running_text_pieces_base_and_whole_word_injected(llama, whole_word_injected):
    ids = llama.convert_tokens_to_ids
    assert groups.running_text_pieces(llama, ["riverrun", "house"]) == [ids(["▁river", "run"]), ids(["▁house"])]
    injected, stats = whole_word_injected
    riverrun, house = groups.running_text_pieces(injected, ["riverrun", "house"])
    assert len(riverrun) == 1 and riverrun[0] >= stats.base_size
    assert vocab.added_words(injected, stats.base_size)[riverrun[0] - stats.base_size] == "riverrun"
    assert house == ids(["▁house"])


def test_the_studys_pieces_without_the_marker_are_other_rows(whole_word_injected):
    # The study's defect: the bare string, no word-start marker. For "house" that is the
    # mid-word piece "house" instead of "▁house"; for an injected Wake word, base pieces
    # instead of its new row.
    injected, stats = whole_word_injected
    model = tokenizers_backend(injected).model
    for word in ("house", "riverrun"):
        unmarked = [token.id for token in model.tokenize(word)]
        (running,) = groups.running_text_pieces(injected, [word])
        assert unmarked != running
        assert max(unmarked) < stats.base_size
    assert [t.value for t in model.tokenize("house")] == ["house"]


def test_under_the_studys_pieces_no_affix_pair_touches_a_wake_row(llama, whole_word_injected):
    # BUILD.md's figure: 1,141 of the 1,168 affix pairs touch a Wake row in running text, none
    # when each word is the BPE pieces of its bare string.
    injected, stats = whole_word_injected
    lexicon = vocab.load_lexicon(SHARED_DATA / "wake_lexicon.txt")
    found = groups.build_affix_groups(lexicon, groups.base_whole_words(llama))
    model = tokenizers_backend(injected).model
    pairs = [(w, b) for g in found for w, b in zip(g.examples, g.bases)]
    unmarked = sum(max(t.id for word in pair for t in model.tokenize(word)) >= stats.base_size for pair in pairs)
    _, info = groups.alignment_data(injected, found, [], stats.base_size, band=(1.0, 0.5))
    assert (len(pairs), unmarked, info["morph_pairs_touching_trainable"]) == (1168, 0, 1141)


def test_alignment_data_counts_pairs_touching_trainable_rows(whole_word_injected):
    injected, stats = whole_word_injected
    # "somehows" is a new row; "house" + "s" = "houses", a base token: that pair touches no Wake row.
    morph = [MorphemeGroup("s", "suffix", ("somehows", "transparents", "houses"), ("somehow", "transparent", "house"))]
    device = [DeviceGroup("portmanteau", ("riverrun", "somehows")), DeviceGroup("pun", ("house",))]
    data, info = groups.alignment_data(injected, morph, device, stats.base_size, band=(1.0, 0.5))
    assert info["morph_pairs"] == 3 and info["morph_pairs_touching_trainable"] == 2
    assert info["morph_words_one_new_row"] == 2
    assert info["device_words"] == 3 and info["device_words_touching_trainable"] == 2
    assert info["wake_rows"] == stats.added and info["max_pieces"] == 1
    assert info["group_names"] == {"morph": ["suffix s"], "device": ["portmanteau", "pun"]}
    assert data.morph_words.ids.shape == (3, 1) and data.num_groups == 1
    np.testing.assert_array_equal(data.device, [0, 0, 1])
    table = jax.random.normal(jax.random.key(0), (stats.total + 3, 8))  # 3 padding rows
    terms = jax.jit(alignment.alignment_terms, static_argnums=2)(table, data, alignment.AlignmentWeights(),
                                                                 jax.random.key(1))
    assert all(np.isfinite(float(v)) for v in terms.values())


def test_build_groups_on_the_real_lexicon(shared_data, tmp_path, capsys):
    out = tmp_path / "groups.jsonl"
    code = launcher.main(build_groups.BuildGroupsConfig, build_groups.run, build_groups.__doc__, [
        "build_groups", f"--lexicon={shared_data / 'wake_lexicon.txt'}",
        f"--tokenizer={shared_data / 'tinyllama_tokenizer'}", f"--out={out}"])
    assert code == 0
    counts = json.loads(build_groups.counts_path(out).read_text(encoding="utf-8"))
    # The figures README quotes.
    assert (counts["groups"], counts["pairs"], counts["words_matched"]) == (6, 1168, 1164)
    assert counts["pairs_per_group"] == {"suffix s": 425, "suffix ed": 211, "suffix ing": 184, "suffix y": 226,
                                         "prefix un": 56, "prefix re": 66}
    assert counts["touching_trainable"]["whole_word"]["morph_pairs_touching_trainable"] == 1141
    assert counts["touching_trainable"]["reference"]["morph_pairs_touching_trainable"] == 1139
    assert len(groups.read_morpheme_groups(out)) == 6
    assert "6 groups, 1168 pairs" in capsys.readouterr().out


def test_build_groups_flag_errors(tmp_path, capsys):
    code = launcher.main(build_groups.BuildGroupsConfig, build_groups.run, build_groups.__doc__,
                         ["build_groups", f"--out={tmp_path / 'g.jsonl'}"])
    assert code == launcher.EXIT_USER_ERROR
    assert "--lexicon, --tokenizer required" in capsys.readouterr().err


def test_build_groups_help_lists_its_flags(capsys):
    assert launcher.main(build_groups.BuildGroupsConfig, build_groups.run, build_groups.__doc__,
                         ["build_groups", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("lexicon", "tokenizer", "out", "min_pairs", "min_stem"):
        assert f"  --{flag}  (default: " in text
    code = launcher.main(build_groups.BuildGroupsConfig, build_groups.run, build_groups.__doc__,
                         ["build_groups", "--lexicon=l", "--tokenizer=t", "--out=o", "--min_pairs=0"])
    assert code == launcher.EXIT_USER_ERROR and "--min_pairs=0 must be at least 1" in capsys.readouterr().err
