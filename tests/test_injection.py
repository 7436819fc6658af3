"""Tests for the injection modes (wake2vec.tokens.whole_word, vocab.inject) and their measurement
(wake2vec.tokens.segmentation).

Synthetic tests build two tiny BPE tokenizers locally, one in the Llama tokenizer.json
layout (normalizer marks word starts with "▁", no pre-tokenizer) and one byte-level
(GPT-2 style ByteLevel pre-tokenizer), and check each promise of whole-word injection on
a text with the hard cases: a lexicon fragment inside English words ("ack" in
"acknowledge"), a lexicon word at a line start and after "(", a hyphenated lexicon word,
a non-lexicon word that extends a lexicon word ("riverrun's"), a GPT-2 contraction with
letters after it ("I'se"). Real-fixture tests run both modes on the whole Wake with
Llama 2's tokenizer and SmolLM2's byte-level one.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tools import injection_table
from wake2vec.training import data
from wake2vec.tokens import segmentation, vocab, whole_word, words

_TEXT = (
    "I acknowledge the ack, that ack\nack (ack) o'er-the-weir back. riverrun's riverrun, I'se home\n"
    "riverrun past eve and adams from swerve of shore to bend of bay brings us back to howth castle"
)
_LEXICON = ["ack", "o'er-the-weir", "riverrun", "hom", "howth"]
# The tokenizers learn English without the lexicon, so every lexicon word is several pieces.
_ENGLISH = (
    "I know that the river brings us home to the shore; she was understanding everything and "
    "went home together with the others before breakfast. Where is the castle, and how is the bay?"
)


def _train(tok: Tokenizer, size: int, **kwargs) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False, **kwargs)
    tok.train_from_iterator([_ENGLISH] * 3, trainer)
    return tok


@functools.lru_cache(maxsize=None)
def _backend_json(kind: str) -> str:
    if kind == whole_word.SENTENCEPIECE:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        _train(tok, 120, initial_alphabet=sorted(set(_TEXT.replace(" ", "▁")) | {"▁"}))
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        _train(tok, 400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok.to_str()


def _base(kind: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_backend_json(kind)), unk_token="<unk>")


def _tokens_of(tokenizer, text: str, word_start: int, word_end: int) -> list[str]:
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return [t for t, (s, e) in zip(enc.tokens, enc.offsets) if e > word_start and s < word_end]


FAMILIES = (whole_word.SENTENCEPIECE, whole_word.BYTE_LEVEL)


@pytest.mark.parametrize("kind", FAMILIES)
def test_whole_word_keeps_every_other_word_and_makes_each_lexicon_word_one_token(kind):
    base = _base(kind)
    assert whole_word.family(base) == kind
    tok, stats, forms = vocab.inject(base, _LEXICON, "whole_word", _TEXT)
    assert len(base) == stats.base_size  # the base tokenizer is left as it was
    assert stats.total == stats.base_size + stats.added == len(tok) == stats.base_size + len(forms)
    # Marked forms of every word first, then the unmarked forms the text uses ("\nack", "(ack").
    marked = [f.word for f in forms if f.marked]
    assert [f.word for f in forms if not f.marked] == ["ack", "riverrun"]
    assert marked == [w for w in _LEXICON if f"{whole_word.form_string(kind, whole_word.Form(w, True))}" not in base.get_vocab()]
    vocab_ids = tok.get_vocab()
    marked_ack = vocab_ids[whole_word.form_string(kind, whole_word.Form("ack", True))]
    unmarked_ack = vocab_ids[whole_word.form_string(kind, whole_word.Form("ack", False))]
    assert marked_ack >= stats.base_size and unmarked_ack >= stats.base_size

    report, mask = segmentation.measure(base, tok, _TEXT, _LEXICON, stats.base_size, "whole_word")
    assert report.resegmented_occurrences == 0 and report.collateral == 0.0 and not mask.any()
    assert report.round_trip_exact
    assert report.lexicon_multi_piece_covered == report.lexicon_multi_piece_occurrences > 0

    ids = tok.backend_tokenizer.encode(_TEXT, add_special_tokens=False).ids
    assert tok.decode(ids) == _TEXT
    # "ack" after a space, after a newline and after "(": one token each; the boundary is inside it.
    for at, expected in ((_TEXT.index(" ack,") + 1, marked_ack), (_TEXT.index("\nack") + 1, unmarked_ack),
                         (_TEXT.index("(ack") + 1, unmarked_ack)):
        enc = tok.backend_tokenizer.encode(_TEXT, add_special_tokens=False)
        inside = [i for i, (s, e) in zip(enc.ids, enc.offsets) if e > at and s < at + 3]
        assert inside == [expected]
    weir = _TEXT.index("o'er")
    assert len(_tokens_of(tok, _TEXT, weir, weir + len("o'er-the-weir"))) == 1
    for word in ("acknowledge", "riverrun's", "I'se", "home", "back"):
        at = _TEXT.index(word)
        assert _tokens_of(tok, _TEXT, at, at + len(word)) == _tokens_of(base, _TEXT, at, at + len(word)), word


@pytest.mark.parametrize("kind", FAMILIES)
def test_reference_injection_is_measured_as_re_segmenting_english(kind):
    base = _base(kind)
    tok, stats, forms = vocab.inject(base, _LEXICON, "reference", _TEXT)
    assert len(base) == stats.base_size and all(f.marked for f in forms)
    assert [f.word for f in forms] == vocab.added_words(tok, stats.base_size)
    report, mask = segmentation.measure(base, tok, _TEXT, _LEXICON, stats.base_size, "reference")
    # "hom" and "riverrun" match inside "home" and "riverrun's" (and, byte-level, "ack" inside "back").
    assert {"home", "riverrun's"} <= _changed_words(base, tok)
    assert report.resegmented_occurrences >= 2
    assert report.collateral == report.resegmented_occurrences / report.non_lexicon_occurrences
    # The mask holds exactly the base-token positions of the changed words.
    enc = tok.backend_tokenizer.encode(_TEXT, add_special_tokens=False)
    assert mask.shape == (len(enc.ids),) and mask.sum() > 0
    assert all(i < stats.base_size for i in np.asarray(enc.ids)[mask])


def _changed_words(base, tok) -> set[str]:
    """Naive: each word of the text, re-tokenized in place, compared token by token."""
    changed = set()
    lexicon = set(_LEXICON)
    for start, end in words.word_spans(_TEXT):
        word = _TEXT[start:end]
        if word not in lexicon and _tokens_of(base, _TEXT, start, end) != _tokens_of(tok, _TEXT, start, end):
            changed.add(word)
    return changed


@pytest.mark.parametrize("kind", FAMILIES)
def test_whole_word_tokenizer_saves_and_reloads_to_the_same_behaviour(kind, tmp_path):
    tok, stats, _ = vocab.inject(_base(kind), _LEXICON, "whole_word", _TEXT)
    out = vocab.save_tokenizer(tok, tmp_path)
    sample = _TEXT + "\nack-ack riverrun. (howth) ack"
    expected = tok(sample, add_special_tokens=False).input_ids
    for reloaded in (vocab.load_base_tokenizer(out), AutoTokenizer.from_pretrained(str(out))):
        assert len(reloaded) == len(tok)
        assert reloaded(sample, add_special_tokens=False).input_ids == expected
        assert reloaded.decode(expected) == sample
        assert vocab.added_words(reloaded, stats.base_size) == vocab.added_words(tok, stats.base_size)


@pytest.mark.parametrize("kind", FAMILIES)
def test_subword_pieces_are_the_running_text_pieces_of_each_form(kind):
    base = _base(kind)
    _, _, forms = vocab.inject(base, _LEXICON, "whole_word", _TEXT)
    pieces = vocab.subword_piece_ids(base, forms)
    backend = base.backend_tokenizer
    for form, ids in zip(forms, pieces):
        text = ("so " if form.marked else "so\n") + form.word
        enc = backend.encode(text, add_special_tokens=False)
        start = len(text) - len(form.word)
        expected = [i for i, t, (s, e) in zip(enc.ids, enc.tokens, enc.offsets) if e > start and t not in ("▁", "Ġ")]
        assert ids == expected, form
    marked, unmarked = (base.convert_ids_to_tokens(pieces[forms.index(whole_word.Form("riverrun", m))])[0] for m in (True, False))
    marker = "▁" if kind == whole_word.SENTENCEPIECE else "Ġ"
    assert marked == marker + "river" and unmarked == "river"  # the marker is inside the first piece


def test_whole_word_refuses_an_unknown_pipeline_by_flag():
    tok = Tokenizer.from_str(_backend_json(whole_word.SENTENCEPIECE))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(whole_word.WholeWordError, match=r"--injection=reference"):
        vocab.inject(PreTrainedTokenizerFast(tokenizer_object=tok), _LEXICON, "whole_word", _TEXT)


def test_inject_unknown_mode_lists_the_modes():
    with pytest.raises(ValueError, match=r"reference, whole_word"):
        vocab.inject(_base(whole_word.SENTENCEPIECE), _LEXICON, "fragments", _TEXT)


# ---------------------------------------------------------------- real fixtures


@functools.lru_cache(maxsize=None)
def _real(shared: pathlib.Path, family: str, mode: str):
    if family == "llama":
        base = vocab.load_base_tokenizer(shared / "tinyllama_tokenizer")
    else:
        pytest.importorskip("gguf")
        base = AutoTokenizer.from_pretrained(str(shared / "smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    lexicon = vocab.load_lexicon(shared / "wake_lexicon.txt")
    text = data.read_corpus(shared / "finnegans_wake.txt")
    tok, stats, _ = vocab.inject(base, lexicon, mode, text)
    report, mask = segmentation.measure(base, tok, text, lexicon, stats.base_size, mode)
    return tok, stats, report, mask


@pytest.mark.slow  # tokenizes the whole Wake twice
@pytest.mark.parametrize("family", ["llama", "smollm2"])
def test_real_whole_word_meets_the_targets_on_the_whole_wake(shared_data, family):
    _, stats, report, mask = _real(shared_data, family, "whole_word")
    assert report.resegmented_occurrences == 0 and report.collateral == 0.0 and not mask.any()
    assert report.coverage_multi_piece >= 0.99
    assert report.round_trip_exact
    assert report.corpus_tokens < report.corpus_tokens_base
    assert mask.shape == (report.corpus_tokens,)


def test_real_reference_reproduces_the_study_through_inject(shared_data):
    tok, stats, report, mask = _real(shared_data, "llama", "reference")
    assert (stats.base_size, stats.added, stats.total) == (32000, 44500, 76500)
    reference = json.loads((shared_data / "tinyllama_added_tokens.json").read_text(encoding="utf-8"))
    vocabulary = tok.get_vocab()
    assert all(vocabulary.get(w) == i for w, i in reference.items())
    assert report.corpus_tokens == 360623 and report.corpus_tokens_base == 419703
    # The damage the issue reports, now measured: thousands of English occurrences re-segmented.
    assert report.resegmented_occurrences > 10000 and not report.round_trip_exact
    assert mask.sum() > report.resegmented_occurrences


def test_injection_results_page_is_the_measured_one():
    # docs/results/injection.md quotes docs/injection.json, which `python -m tools.injection_table` writes.
    assert injection_table.main(["--check"]) == 0
