"""Neighbour quality as a number: the pairs, the edit-distance rule, and the source ranks.

Each piece is held against an answer known by construction or a naive reference: the
Levenshtein distance against the textbook recursion; the rule against comparing every Wake
word with every base word; ranks against a full sort and against candidates laid out at
known angles; the summary section against ranks computed here by brute force.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import struct

import numpy as np
import pytest

from experiments import analyze as analyze_launcher
from wake2vec.tokens import vocab
from wake2vec.analysis import metrics, report, source_pairs, source_rank
from wake2vec.analysis.source_pairs import SourcePair
from wake2vec.demo.tokenizer import train_demo_tokenizer
from tests.launchers import run_here



@functools.lru_cache(maxsize=None)
def _naive_levenshtein(a: str, b: str) -> int:
    """The definition itself: the last letters match, or one of three edits."""
    if not a or not b:
        return len(a) + len(b)
    return min(_naive_levenshtein(a[:-1], b) + 1, _naive_levenshtein(a, b[:-1]) + 1,
               _naive_levenshtein(a[:-1], b[:-1]) + (a[-1] != b[-1]))


def test_levenshtein_known_values_and_the_recursion():
    assert source_pairs.levenshtein("kitten", "sitting") == 3
    assert source_pairs.levenshtein("misunderstord", "misunderstood") == 1
    assert source_pairs.levenshtein("", "abc") == 3 and source_pairs.levenshtein("same", "same") == 0
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abc"), size=rng.integers(0, 7))) for _ in range(60)]
    for a, b in itertools.combinations(words, 2):
        assert source_pairs.levenshtein(a, b) == source_pairs.levenshtein(b, a) == _naive_levenshtein(a, b)


def _rule_by_brute_force(wake_words, base_words):
    """The documented rule applied literally: every Wake word against every base word."""
    lowercase = re.compile(r"[a-z]+")
    base = {w for w in base_words if lowercase.fullmatch(w)}
    found = []
    for wake in sorted(set(wake_words)):
        if len(wake) < source_pairs.RULE_MIN_WAKE_LENGTH or not lowercase.fullmatch(wake) or wake in base:
            continue
        limit = 2 if len(wake) >= source_pairs.RULE_LONG_WAKE_LENGTH else 1
        near = [(_naive_levenshtein(wake, w), w) for w in base if w[0] == wake[0]]
        near = [(d, w) for d, w in near if d <= limit]
        if near:
            best = min(d for d, _ in near)
            winners = [w for d, w in near if d == best]
            if len(winners) == 1:
                found.append((SourcePair(wake, winners[0]), best))
    return found


def test_edit_distance_rule_on_a_hand_made_vocabulary():
    base = ["mother", "sitting", "sifting", "matter", "mather", "grasses", "twenty", "summer", "everybody",
            "Summer", "travail"]
    wake = {
        "meother": ("mother", 1),        # one insertion; nothing else within 1
        "sitthing": ("sitting", 1),      # sifting is 2 away: sitting is the unique nearest
        "matther": None,                 # matter and mather both 1 away: not unique
        "drasses": None,                 # grasses is 1 away but starts with another letter
        "twenny": None,                  # 6 letters: below the minimum length
        "sumwerr": None,                 # summer is 2 away, and 7 letters allow only 1
        "everybiddy": ("everybody", 2),  # 10 letters allow 2
        "Summwer": None,                 # not lowercase ASCII
        "travail": None,                 # itself a whole-word base token: no respelling
    }
    found = dict(source_pairs.edit_distance_pairs(wake, base))
    expected = {SourcePair(w, answer[0]): answer[1] for w, answer in wake.items() if answer is not None}
    assert found == expected
    assert source_pairs.edit_distance_pairs(wake, base) == _rule_by_brute_force(wake, base)


def test_edit_distance_rule_equals_brute_force_on_a_dense_vocabulary():
    # A three-letter alphabet puts many words within one or two edits of each other, so
    # ties, first-letter and distance limits all occur; the deletion index must find them all.
    rng = np.random.default_rng(1)
    def words(n, lo, hi):
        return ["".join(rng.choice(list("abc"), size=rng.integers(lo, hi + 1))) for _ in range(n)]
    base, wake = words(400, 5, 11), words(300, 6, 12)
    found = source_pairs.edit_distance_pairs(wake, base)
    assert found == _rule_by_brute_force(wake, base)
    assert {d for _, d in found} == {1, 2}  # both limits were exercised


def test_vocabulary_maps_for_sentencepiece_and_byte_level_tokens():
    for marker in source_pairs.WORD_START_MARKERS:
        base = ["<unk>", f"{marker}mother", "ther", f"{marker}{marker}", f"{marker}The", marker, f"{marker}summer"]
        new = [f"{marker}meother", "summwer", None]  # added tokens shown normalised or raw
        tokens = base + new
        wake_ids, english_ids, found_marker = source_pairs.vocabulary_maps(lambda i: tokens[i], len(base), len(tokens))
        assert found_marker == marker
        assert english_ids == {"mother": 1, "The": 4, "summer": 6}
        assert wake_ids == {"meother": 7, "summwer": 8}
    assert source_pairs.word_start_marker(["a", "b", None]) is None
    assert source_pairs.whole_word_ids(["a", "▁b"], None) == {}


def test_resolve_pairs_skips_and_counts():
    pairs = [SourcePair("meother", "mother"), SourcePair("tosorrow", "tomorrow"), SourcePair("absent", "mother")]
    resolved = source_pairs.resolve_pairs(pairs, {"meother": 10, "tosorrow": 11}, {"mother": 3})
    assert resolved.pairs == [pairs[0]] and resolved.wake_ids == [10] and resolved.english_ids == [3]
    assert resolved.skipped == {"wake_not_a_new_token": [pairs[2]], "english_not_a_single_base_token": [pairs[1]]}


def test_read_pairs_format_and_errors(tmp_path):
    good = tmp_path / "pairs.txt"
    good.write_text("# a comment\n\nmeother  mother   # trailing comment\nbrooher\tbrother\n", encoding="utf-8")
    assert source_pairs.read_pairs(good) == [SourcePair("meother", "mother"), SourcePair("brooher", "brother")]
    cases = {
        "meother mother\nbrooher\n": "line 2: expected two words 'WAKE ENGLISH', got 1",
        "a b c\n": "line 1: expected two words 'WAKE ENGLISH', got 3",
        "a b\n# x\na b\n": "line 3: the pair a b is already on line 1",
        "# only a comment\n": "no pairs found",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(source_pairs.PairsFileError, match=re.escape(f"{bad} {message}" if "line" in message
                                                                        else message)):
            source_pairs.read_pairs(bad)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cafe\n".encode("latin-1"))
    with pytest.raises(source_pairs.PairsFileError, match="not UTF-8"):
        source_pairs.read_pairs(tmp_path / "latin1.txt")
    with pytest.raises(source_pairs.PairsFileError, match="no such file"):
        source_pairs.read_pairs(tmp_path / "absent.txt")


def test_builtin_pairs_are_well_formed():
    pairs = source_pairs.builtin_pairs()
    assert len(pairs) == len(set(pairs)) >= 50
    assert SourcePair("misunderstord", "misunderstood") in pairs


def test_source_ranks_at_known_angles():
    # Candidates are unit vectors in a plane at angles 0.1 j (with random lengths, which a
    # cosine ignores); the query points along angle 0, so candidate j has rank j + 1.
    rng = np.random.default_rng(2)
    angles = 0.1 * np.arange(20)
    candidates = np.stack([np.cos(angles), np.sin(angles), np.zeros(20)], axis=1) * rng.uniform(0.5, 3, (20, 1))
    targets = np.array([0, 4, 19, 7])
    queries = np.tile([2.0, 0.0, 0.0], (targets.size, 1))
    ranks, cosines = metrics.source_ranks(queries, candidates, targets)
    np.testing.assert_array_equal(ranks, targets + 1)
    np.testing.assert_allclose(cosines, np.cos(angles[targets]), atol=1e-12)


def test_source_ranks_equal_a_full_sort_with_ties_to_the_lower_id():
    rng = np.random.default_rng(3)
    candidates = rng.standard_normal((300, 6))
    candidates[150] = 4.0 * candidates[40]  # the same direction twice (x4 scales exactly): an exact tie
    queries = rng.standard_normal((70, 6))
    queries[0] = candidates[40]
    targets = rng.integers(0, 300, size=70)
    targets[:2] = [150, 40]
    queries[1] = candidates[40]
    # block=16 splits the 70 queries into five blocks, as real runs split theirs by 512.
    ranks, cosines = metrics.source_ranks(queries, candidates, targets, block=16)
    for i, target in enumerate(targets):
        scores = metrics.cosine_scores(queries[i : i + 1], candidates)[0]
        order = np.lexsort((np.arange(300), -scores))  # nearest first, ties by lower id
        assert ranks[i] == 1 + int(np.flatnonzero(order == target)[0])
        assert cosines[i] == pytest.approx(scores[target], rel=1e-12)  # one query vs a block: BLAS rounding
    assert ranks[0] == 2 and ranks[1] == 1  # row 150 ties with row 40 and comes after it


def test_rank_summary_closed_form():
    stats = metrics.rank_summary([1, 2, 3, 10, 100, 5], [0.5, 0.1, 0.3, 0.2, 0.4, 0.3])
    assert stats == {"n": 6, "median_rank": 4.0, "share_top5": pytest.approx(4 / 6), "share_top50": pytest.approx(5 / 6),
                     "mean_cosine": pytest.approx(0.3)}
    assert metrics.rank_summary([], []) is None


N_BASE, N_NEW, DIM = 120, 40, 16
PAIRED = {"meother": "mother", "brooher": "brother", "summwer": "summer", "parfect": "perfect",
          "durkness": "darkness", "twenny": "twenty", "comming": "coming"}
USER = {"riverrun": "river", "brooher": "brother"}


@pytest.fixture(scope="module")
def table():
    """Base rows are random; "meother" etc. are their sources plus noise of growing size, so
    the trained ranks are 1 for the first pairs and larger later; the pre-training snapshot
    is unrelated noise."""
    rng = np.random.default_rng(4)
    post = rng.standard_normal((N_BASE + N_NEW, DIM))
    tokens = [f"<{i}>" for i in range(N_BASE)]
    english = sorted(set(PAIRED.values()) | {"river", "perfects"})
    for j, word in enumerate(english):
        tokens[20 + j] = "▁" + word
    new_words = list(PAIRED) + ["riverrun"] + [f"w{i}" for i in range(N_NEW - len(PAIRED) - 1)]
    tokens += ["▁" + w for w in new_words]
    for k, (wake, source) in enumerate(PAIRED.items()):
        post[N_BASE + new_words.index(wake)] = post[tokens.index("▁" + source)] + 0.4 * k * rng.standard_normal(DIM)
    pre = rng.standard_normal(post.shape)
    return post.astype(np.float32), pre.astype(np.float32), tokens


def _brute_force_rank(table, wake_row, english_row):
    units = table[:N_BASE].astype(np.float64)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    query = table[wake_row].astype(np.float64)
    scores = units @ (query / np.linalg.norm(query))
    return 1 + int(np.sum(scores > scores[english_row]))  # no exact ties in random rows


def test_summary_source_rank_section_by_brute_force(table, tmp_path):
    post, pre, tokens = table
    pairs_file = tmp_path / "mine.txt"
    pairs_file.write_text("".join(f"{w} {e}\n" for w, e in USER.items()), encoding="utf-8")
    summary = report.run_analysis(post, N_BASE, tmp_path, E_pre=pre, tokens=tokens, pairs_file=pairs_file)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    section = summary["source_rank"]
    assert set(section) == {"builtin", "edit_distance", "user"}
    builtin = section["builtin"]
    builtin_words = {p.wake for p in source_pairs.builtin_pairs()}
    assert builtin["used"] == len(set(PAIRED) & builtin_words) and builtin["listed"] == len(builtin_words)
    assert builtin["skipped"]["wake_not_a_new_token"]["n"] == builtin["listed"] - builtin["used"]
    # Every reported rank is the brute-force rank, before and after; the summary figures follow.
    for name, group in section.items():
        for row in group["pairs"]:
            assert tokens[row["wake_id"]] == "▁" + row["wake"] and tokens[row["english_id"]] == "▁" + row["english"]
            assert row["rank_post"] == _brute_force_rank(post, row["wake_id"], row["english_id"])
            assert row["rank_pre"] == _brute_force_rank(pre, row["wake_id"], row["english_id"])
        ranks = np.array([row["rank_post"] for row in group["pairs"]])
        assert group["post"]["median_rank"] == np.median(ranks)
        assert group["post"]["share_top5"] == np.mean(ranks <= 5)
        assert group["post"]["share_top50"] == np.mean(ranks <= 50)
    # The closest pairs (noise 0 and 0.4) are each other's nearest after training.
    by_wake = {row["wake"]: row for row in builtin["pairs"]}
    assert by_wake["meother"]["rank_post"] == 1 and by_wake["brooher"]["rank_post"] == 1
    # The rule finds "parfect" -> "perfect" (and not "perfects", 2 away) but not the 6-letter "twenny".
    rule = {row["wake"]: (row["english"], row["distance"]) for row in section["edit_distance"]["pairs"]}
    assert rule["parfect"] == ("perfect", 1) and "twenny" not in rule
    assert section["user"]["used"] == 2  # riverrun -> river, brooher -> brother
    assert summary["meta"]["sampling"]["source_rank"]["user_file"] == str(pairs_file)
    with (tmp_path / report.SOURCE_RANK_FIGURE_FILENAME).open("rb") as png:
        assert struct.unpack(">II", png.read(24)[16:24]) == (1000, 600)


def test_source_rank_without_tokens_or_snapshot(table, tmp_path):
    post, _, tokens = table
    assert report.analyze(post, N_BASE)["source_rank"] is None
    without_pre = report.analyze(post, N_BASE, tokens=tokens)["source_rank"]["builtin"]
    assert without_pre["pre"] is None and without_pre["post"]["n"] == without_pre["used"]
    (tmp_path / "p.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(source_pairs.PairsFileError, match="needs token names"):
        report.analyze(post, N_BASE, pairs_file=tmp_path / "p.txt")


def test_rule_pairs_are_sampled_to_the_cap(table, monkeypatch):
    post, pre, tokens = table
    monkeypatch.setattr(source_rank, "MAX_RULE_PAIRS", 2)
    summary = report.analyze(post, N_BASE, E_pre=pre, tokens=tokens, seed=5)
    meta = summary["meta"]["sampling"]["source_rank"]
    assert meta["edit_distance_used"] == 2 < meta["edit_distance_found"]
    assert summary["source_rank"]["edit_distance"]["used"] == 2
    assert report.analyze(post, N_BASE, E_pre=pre, tokens=tokens, seed=5) == summary


def test_headline_names_each_group(table):
    post, pre, tokens = table
    text = source_rank.headline(report.analyze(post, N_BASE, E_pre=pre, tokens=tokens))
    assert text.splitlines()[0].startswith(f"source rank among {N_BASE} base rows")
    assert re.search(r"builtin: \d+ of \d+ pairs: median .* -> median", text)


def test_builtin_pairs_in_the_wake_and_tinyllama(shared_data):
    """Every built-in Wake word is a word of the text and of the lexicon, and all but the
    three documented English words are single TinyLlama tokens."""
    text = (shared_data / "finnegans_wake.txt").read_text(encoding="utf-8")
    words_in_text = set(re.findall(r"[^\W\d_]+", text))
    lexicon = set((shared_data / "wake_lexicon.txt").read_text(encoding="utf-8").split())
    vocab = json.loads((shared_data / "tinyllama_tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = vocab["model"]["vocab"]
    pairs = source_pairs.builtin_pairs()
    for pair in pairs:
        assert pair.wake in words_in_text and pair.wake in lexicon, pair
        assert "▁" + pair.wake not in vocab, pair  # a new token, not a base piece
    assert {p.english for p in pairs if "▁" + p.english not in vocab} == {"misunderstood", "tomorrow", "commodious"}


def test_launcher_pairs_flag_with_a_real_tokenizer(tmp_path, capsys):
    """--pairs through the launcher: a saved tokenizer gives the names; a bad file fails
    with its line, before any analysis is written."""
    tokenizer = train_demo_tokenizer("the mother and the brother of the summer river " * 20, vocab_size=300)
    base = len(tokenizer)
    vocab.augment_tokenizer(tokenizer, ["meother", "brooher", "riverrun"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rng = np.random.default_rng(6)
    post = rng.standard_normal((len(tokenizer), 8)).astype(np.float32)
    english = {w: tokenizer.convert_tokens_to_ids("▁" + w) for w in ("mother", "brother", "river")}
    assert all(i < base for i in english.values())  # whole-word base tokens of this tokenizer
    post[base] = post[english["mother"]]  # meother points exactly at mother: rank 1
    np.save(tmp_path / "post.npy", post)
    (tmp_path / "pairs.txt").write_text("meother mother\nriverrun river\n", encoding="utf-8")
    summary = analyze_launcher.analyze_files(tmp_path / "post.npy", base, tmp_path / "out",
                                             tokenizer_dir=tmp_path / "tokenizer", pairs_file=tmp_path / "pairs.txt")
    user = summary["source_rank"]["user"]
    assert user["used"] == 2 and user["pairs"][0]["rank_post"] == 1 and user["pre"] is None

    (tmp_path / "bad.txt").write_text("meother mother\nriverrun\n", encoding="utf-8")
    result = run_here(capsys, "analyze", f"--post={tmp_path / 'post.npy'}", f"--base_vocab_size={base}",
                      f"--pairs={tmp_path / 'bad.txt'}", f"--out_dir={tmp_path / 'bad'}")  # the file is read first
    assert result.returncode != 0
    assert f"{tmp_path / 'bad.txt'} line 2: expected two words 'WAKE ENGLISH', got 1" in result.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()
