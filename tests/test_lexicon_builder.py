"""The lexicon builder: word extraction, selection, ranking, and the build_lexicon launcher."""

from __future__ import annotations

import pathlib
import re
import subprocess
import unicodedata

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
import transformers

from wake2vec.tokens import lexicon_builder
from wake2vec.demo import tokenizer as demo_tokenizer
from wake2vec.tokens.lexicon_builder import LexiconEntry, build_lexicon, count_words, extract_words
from tests.launchers import run_here

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "wake2vec" / "demo" / "data" / "sample.txt"


def pieces_from(table: dict[str, int]):
    """A stand-in tokenizer: each word's piece count from a table, so rankings are exact."""
    return lambda word: table[word]


# --- extract_words -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ("Brékkek-style coinages, o'er-the-weir!", ["Brékkek-style", "coinages", "o'er-the-weir"]),
        ("rock’n’roll and Adam's", ["rock’n’roll", "and", "Adam's"]),
        ("\"Quoth\" the 'raven', (softly) -- dreamers' ‘rest’.", ["Quoth", "the", "raven", "softly", "dreamers", "rest"]),
        ("river--and -weir- end-", ["river", "and", "weir", "end"]),
        ("1132 4th B52 snake_case A.D. x2", ["A", "D"]),
        ("Éire naïve château déjà", ["Éire", "naïve", "château", "déjà"]),
    ],
)
def test_extract_words(text, words):
    assert extract_words(text) == words


def test_extract_words_returns_nfc():
    decomposed = unicodedata.normalize("NFD", "Kroákkak déjàvuing")
    assert decomposed != "Kroákkak déjàvuing"
    assert extract_words(decomposed) == ["Kroákkak", "déjàvuing"]


def test_extract_words_keeps_accents_that_have_no_precomposed_form():
    # q + combining acute has no NFC composite; the mark stays inside the word.
    assert extract_words("aq\u0301b cd") == ["aq\u0301b", "cd"]


def test_count_words_is_case_sensitive():
    assert count_words("Dublinked dublinked Dublinked.") == {"Dublinked": 2, "dublinked": 1}


# --- build_lexicon -------------------------------------------------------------------------

TEXT = "alpha alpha alpha beta beta gamma gamma delta delta delta delta once"
PIECES = {"alpha": 3, "beta": 5, "gamma": 3, "delta": 2, "once": 9}


def test_selects_by_min_count_and_min_pieces():
    words = [e.word for e in build_lexicon(TEXT, pieces_from(PIECES), min_count=2, min_pieces=3)]
    assert sorted(words) == ["alpha", "beta", "gamma"]  # delta: 2 pieces; once: 1 occurrence
    words = [e.word for e in build_lexicon(TEXT, pieces_from(PIECES), min_count=3, min_pieces=2)]
    assert sorted(words) == ["alpha", "delta"]


def test_ranks_by_pieces_then_count_then_word_without_frequency():
    entries = build_lexicon(TEXT + " gamma", pieces_from(PIECES), min_count=2, min_pieces=2)
    assert entries == [
        LexiconEntry("beta", 2, 5, None),
        LexiconEntry("alpha", 3, 3, None),
        LexiconEntry("gamma", 3, 3, None),
        LexiconEntry("delta", 4, 2, None),
    ]
    entries = build_lexicon(TEXT, pieces_from(PIECES), min_count=2, min_pieces=2)
    assert [e.word for e in entries] == ["beta", "alpha", "gamma", "delta"]  # alpha: more occurrences


def test_ranks_rarest_in_general_use_first_with_frequency():
    frequency = {"alpha": 50, "beta": 1000, "delta": 50}  # gamma absent: rarest
    entries = build_lexicon(TEXT, pieces_from(PIECES), min_count=2, min_pieces=2, frequency=frequency)
    assert [(e.word, e.general_frequency) for e in entries] == [
        ("gamma", 0),
        ("alpha", 50),  # ties with delta at 50; more pieces first
        ("delta", 50),
        ("beta", 1000),
    ]


def test_frequency_ties_on_pieces_fall_back_to_the_word():
    entries = build_lexicon(TEXT, pieces_from(PIECES), min_count=2, min_pieces=3, frequency={})
    assert [e.word for e in entries] == ["beta", "alpha", "gamma"]


def test_frequency_lookup_falls_back_to_lower_case():
    entries = build_lexicon("Liffey Liffey", lambda w: 4, frequency={"liffey": 7})
    assert entries == [LexiconEntry("Liffey", 2, 4, 7)]


def test_max_words_caps_after_ranking():
    entries = build_lexicon(TEXT, pieces_from(PIECES), min_count=2, min_pieces=2, max_words=2)
    assert [e.word for e in entries] == ["beta", "alpha"]


@pytest.mark.parametrize(
    "kwargs, message",
    [({"min_count": 0}, "min_count"), ({"min_pieces": 0}, "min_pieces"), ({"max_words": -1}, "max_words")],
)
def test_rejects_bad_thresholds(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_lexicon(TEXT, pieces_from(PIECES), **kwargs)


# --- piece_counter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_text() -> str:
    return SAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def demo_tok(sample_text):
    return demo_tokenizer.train_demo_tokenizer(sample_text, vocab_size=1024)


def test_piece_counter_counts_the_mid_text_spelling_with_llama_layout(demo_tok):
    count = lexicon_builder.piece_counter(demo_tok)
    for word in ["riverrunning", "hearthquake", "o'er-the-weir", "Kroákkak-kroákkak", "the"]:
        mid_text = demo_tok.encode(f"and {word} and", add_special_tokens=False)
        alone = demo_tok.encode("and and", add_special_tokens=False)
        assert count(word) == len(mid_text) - len(alone)
        # Llama's normalizer prepends "▁", so the bare word is already its mid-text spelling.
        assert count(word) == len(demo_tok.tokenize(word))


def test_piece_counter_counts_a_leading_bare_word_start_piece(demo_tok):
    # "川" is unseen: Llama layout spends "▁" plus three byte tokens on it, and all four count.
    assert lexicon_builder.piece_counter(demo_tok)("川") == 4


def test_piece_counter_counts_the_mid_text_spelling_with_byte_level_tokenizer():
    # GPT-2 style: "Ġword" after a space differs from "word" at the start of a text.
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["the river runs round the river town"] * 20, trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    count = lexicon_builder.piece_counter(tok)
    assert count("river") == len(tok.encode(" river", add_special_tokens=False))
    assert count("river") != len(tok.encode("river", add_special_tokens=False))


def test_bundled_sample_gives_a_demo_sized_lexicon(sample_text, demo_tok):
    entries = build_lexicon(sample_text, lexicon_builder.piece_counter(demo_tok), min_count=2, min_pieces=3)
    words = {e.word for e in entries}
    assert len(entries) >= 100, len(entries)
    assert {"hearthquake", "o'er-the-weir", "Kroákkak-kroákkak", "crème-de-la-crumble"} <= words


# --- read_frequency_list -------------------------------------------------------------------


def test_read_frequency_list(tmp_path):
    path = tmp_path / "freq.txt"
    nfd = unicodedata.normalize("NFD", "café")
    path.write_text(f"the\t1000\n\nriver   25\n{nfd}\t3\ncafé 2\n", encoding="utf-8")
    assert lexicon_builder.read_frequency_list(path) == {"the": 1000, "river": 25, "café": 5}


@pytest.mark.parametrize("bad_line", ["river", "river 2 3", "river -2", "river 2.5", "river many"])
def test_read_frequency_list_names_the_bad_line(tmp_path, bad_line):
    path = tmp_path / "freq.txt"
    path.write_text(f"the\t1000\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"freq\.txt:2: expected 'word<TAB>count'"):
        lexicon_builder.read_frequency_list(path)


def test_read_frequency_list_reports_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="frequency list file .*nope.txt does not exist"):
        lexicon_builder.read_frequency_list(tmp_path / "nope.txt")


# --- experiments/build_lexicon.py ----------------------------------------------------------
# Run as a subprocess, as users run it: importing a launcher would define its absl flags in
# the test process, where another launcher's flags of the same name would collide.

CORPUS = (
    "The riverwife and the riverwife's hearthquake went riverrunning past the hearthquake. "
    "Riverrunning again, the riverwife said thunderwordy things; thunderwordy, thunderwordy. "
    "The gullwits, the gullwits! Once only: mistomorrow. The the the and and and went went.\n"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, sample_text) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tokenizer")
    demo_tokenizer.train_demo_tokenizer(sample_text, vocab_size=512).save_pretrained(path)
    return path


def run_launcher(capsys, *flags: str) -> subprocess.CompletedProcess:
    return run_here(capsys, "lexicon", *flags)


def expected_words(corpus: str, tokenizer, **kwargs) -> list[str]:
    entries = build_lexicon(corpus, lexicon_builder.piece_counter(tokenizer), **kwargs)
    return [e.word for e in entries]


def test_launcher_writes_the_lexicon_and_a_report(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out = tmp_path / "nested" / "lexicon.txt"
    result = run_launcher(capsys, f"--corpus={corpus}", f"--tokenizer={tokenizer_dir}", f"--out={out}")
    assert result.returncode == 0, result.stderr

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    expected = expected_words(CORPUS, tok, min_count=2, min_pieces=3)
    assert {"riverwife", "hearthquake", "thunderwordy"} <= set(expected)
    assert "mistomorrow" not in expected and "the" not in expected
    assert out.read_text(encoding="utf-8") == "".join(w + "\n" for w in expected)
    assert f"selected: {len(expected)}" in result.stdout
    assert f"1. {expected[0]}  pieces=" in result.stdout


def test_launcher_accepts_tokenizer_json_frequency_list_and_cap(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    frequency = tmp_path / "freq.txt"
    frequency.write_text("hearthquake\t5\nthunderwordy 1\n", encoding="utf-8")
    out = tmp_path / "lexicon.txt"
    result = run_launcher(
        capsys,
        f"--corpus={corpus}", f"--tokenizer={tokenizer_dir / 'tokenizer.json'}", f"--out={out}",
        f"--frequency_list={frequency}", "--max_words=2", "--min_pieces=2",
    )
    assert result.returncode == 0, result.stderr

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    expected = expected_words(
        CORPUS, tok, min_pieces=2, max_words=2, frequency={"hearthquake": 5, "thunderwordy": 1}
    )
    assert out.read_text(encoding="utf-8").splitlines() == expected
    assert len(expected) == 2 and not {"hearthquake", "thunderwordy"} & set(expected)
    assert "rarest first" in result.stdout and "general=0" in result.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--corpus={missing}"], "corpus file .*missing.txt does not exist"),
        (["--frequency_list={bad_freq}"], r"freq\.txt:2: expected 'word<TAB>count'"),
        (["--min_pieces=99"], "lower --min_count or --min_pieces"),
        (["--tokenizer={missing}"], "tokenizer path .*missing.txt does not exist"),
    ],
)
def test_launcher_fails_with_an_actionable_message(tmp_path, tokenizer_dir, flags, message, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    bad_freq = tmp_path / "freq.txt"
    bad_freq.write_text("hearthquake 5\nthunderwordy lots\n", encoding="utf-8")
    paths = {"missing": tmp_path / "missing.txt", "bad_freq": bad_freq}
    defaults = {"corpus": corpus, "tokenizer": tokenizer_dir, "out": tmp_path / "lexicon.txt"}
    given = [flag.format(**paths) for flag in flags]
    named = {flag.split("=")[0] for flag in given}
    args = given + [f"--{k}={v}" for k, v in defaults.items() if f"--{k}" not in named]

    result = run_launcher(capsys, *args)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "lexicon.txt").exists()


def test_injection_report_says_what_reference_injection_would_re_segment(demo_tok):
    # "hearthq" is a fragment: add_tokens matches it inside "hearthquake", whole-word never does.
    reference, whole = lexicon_builder.injection_report(demo_tok, ["hearthq", "thunderwordy"], CORPUS)
    assert reference.startswith("--injection=reference: 2 new tokens; re-segments 2 of ")
    assert ": hearthquake (2)" in reference
    assert whole.startswith("--injection=whole_word: ") and " re-segments 0 of " in whole
    assert "lexicon coverage 100.00% of multi-piece occurrences" in whole


def test_launcher_refuses_an_existing_out_unless_overwrite(tmp_path, tokenizer_dir, capsys):
    corpus, out = tmp_path / "corpus.txt", tmp_path / "mine.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    out.write_text("the user's own file\n", encoding="utf-8")
    refused = run_launcher(capsys, f"--corpus={corpus}", f"--tokenizer={tokenizer_dir}", f"--out={out}")
    assert refused.returncode == 1 and "exists; pass --out=OTHER.txt, or --overwrite" in refused.stderr.splitlines()[-1]
    assert out.read_text(encoding="utf-8") == "the user's own file\n"
    replaced = run_launcher(capsys, f"--corpus={corpus}", f"--tokenizer={tokenizer_dir}", f"--out={out}", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert out.read_text(encoding="utf-8") != "the user's own file\n"


def test_lexicon_entries_without_a_letter_or_digit_are_left_out(tmp_path):
    from wake2vec.tokens import vocab

    path = tmp_path / "lexicon.txt"
    path.write_text("riverrun\n...\n!!!\n—\nhowth2\n", encoding="utf-8")
    assert vocab.load_lexicon(path) == ["riverrun", "howth2"]
