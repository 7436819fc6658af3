"""Tests for wake2vec.tokens.vocab: lexicon, tokenizer augmentation, new-row initialisers.

Synthetic tests use a tiny BPE tokenizer trained locally with the `tokenizers` library in
the layout Llama ships (normalizer Prepend "▁" + Replace " " -> "▁", no pre-tokenizer,
BOS post-processor). Real-fixture tests (../shared/data) check the reference run's figures.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from wake2vec.training import data
from wake2vec.tokens import vocab

_TEXT = (
    "riverrun past eve and adams from swerve of shore to bend of bay brings us by a "
    "commodius vicus of recirculation back to howth castle and environs 1132 oxo"
)


def _tiny_backend() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([_TEXT] * 3, trainer)
    # Switch to the shipped Llama layout: the normalizer marks word starts, nothing pre-splits.
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _tiny_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    _tiny_backend().save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512,
              "tokenizer_class": "LlamaTokenizer", "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "</s>", "lstrip": False}}))
    return folder


def _write(tmp_path: pathlib.Path, name: str, content: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------- lexicon


def test_load_lexicon_strips_normalises_and_deduplicates(tmp_path):
    decomposed = "Bre\u0301kkek"  # e + combining acute: NFC is the single code point é
    content = "\ufeffriverrun\r\n  vicus \n\n\t\n{}\nriverrun\nBr\u00e9kkek\nhowth\n".format(decomposed)
    path = _write(tmp_path, "lex.txt", content.encode("utf-8"))
    assert vocab.load_lexicon(path) == ["riverrun", "vicus", "Br\u00e9kkek", "howth"]


def test_load_lexicon_non_utf8_names_file_and_line(tmp_path):
    path = _write(tmp_path, "latin1.txt", "riverrun\nvicus\nBr\u00e9kkek\n".encode("latin-1"))
    with pytest.raises(vocab.LexiconError, match=r"latin1\.txt:3: .*not valid UTF-8"):
        vocab.load_lexicon(path)


def test_load_lexicon_empty_is_an_error(tmp_path):
    path = _write(tmp_path, "empty.txt", b"\xef\xbb\xbf\n  \n\n")
    with pytest.raises(vocab.LexiconError, match=r"empty\.txt has no words"):
        vocab.load_lexicon(path)


def test_load_lexicon_missing_file(tmp_path):
    with pytest.raises(vocab.LexiconError, match=r"nope\.txt does not exist"):
        vocab.load_lexicon(tmp_path / "nope.txt")


def test_load_lexicon_refuses_inner_whitespace(tmp_path):
    path = _write(tmp_path, "phrases.txt", b"riverrun\nhowth castle\n")
    with pytest.raises(vocab.LexiconError, match=r"phrases\.txt:2: 'howth castle' contains whitespace"):
        vocab.load_lexicon(path)


def test_lexicon_entries_of_punctuation_alone_are_left_out_with_a_warning(tmp_path, caplog):
    """A token for "..." would swallow the text's own punctuation and teach no word."""
    path = _write(tmp_path, "lex.txt", "riverrun\n...\n!!!\n\u2014\nvicus\nO'Connell\n3\n".encode("utf-8"))
    with caplog.at_level("WARNING"):
        assert vocab.load_lexicon(path) == ["riverrun", "vicus", "O'Connell", "3"]
    assert "3 entries without a letter or digit left out ('...', '!!!', '\u2014')" in caplog.text
    only_punctuation = _write(tmp_path, "dots.txt", b"...\n?!\n")
    with pytest.raises(vocab.LexiconError, match=r"dots\.txt has no words"):
        vocab.load_lexicon(only_punctuation)


# ---------------------------------------------------------------- tokenizer loading


def test_load_base_tokenizer_keeps_shipped_pipeline_and_special_tokens(tmp_path):
    folder = _tiny_dir(tmp_path)
    tok = vocab.load_base_tokenizer(folder)
    shipped = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # tokenizer_class says LlamaTokenizer, but the pipeline must be the file's, not a rebuild.
    assert json.loads(tok.backend_tokenizer.to_str())["normalizer"] == json.loads(shipped.to_str())["normalizer"]
    assert tok(_TEXT, add_special_tokens=False).input_ids == shipped.encode(_TEXT, add_special_tokens=False).ids
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    assert tok.model_max_length == 512
    assert len(tok) == shipped.get_vocab_size()


def test_load_base_tokenizer_from_file_path(tmp_path):
    folder = _tiny_dir(tmp_path)
    tok = vocab.load_base_tokenizer(folder / "tokenizer.json")
    assert tok.bos_token == "<s>"  # configs beside the file are still read
    assert tok("vicus").input_ids == [1, tok.get_vocab()["▁vicus"]]


def test_load_base_tokenizer_sentencepiece_only_says_how_to_convert(tmp_path):
    _write(tmp_path, "tokenizer.model", b"\x00")
    with pytest.raises(vocab.VocabError, match=r"no tokenizer\.json in .*tokenizer\.model.*save_pretrained"):
        vocab.load_base_tokenizer(tmp_path)


def test_load_base_tokenizer_malformed_files(tmp_path):
    folder = _tiny_dir(tmp_path)
    (folder / "special_tokens_map.json").write_text("{")
    with pytest.raises(vocab.VocabError, match=r"special_tokens_map\.json is not valid JSON"):
        vocab.load_base_tokenizer(folder)
    (folder / "special_tokens_map.json").unlink()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(vocab.VocabError, match=r"cannot load .*tokenizer\.json"):
        vocab.load_base_tokenizer(folder)


def test_load_base_tokenizer_missing_path(tmp_path):
    with pytest.raises(vocab.VocabError, match=r"absent does not exist"):
        vocab.load_base_tokenizer(tmp_path / "absent")


# ---------------------------------------------------------------- augmentation


def test_augment_tokenizer_counts_and_ids(tmp_path):
    tok = vocab.load_base_tokenizer(_tiny_dir(tmp_path))
    base = len(tok)
    known = tok.get_vocab()
    assert "riverrun" not in known and "howth" not in known and "xo" in known  # precondition of the counts
    words = ["riverrun", "xo", "howth", "riverrun"]  # "xo" is a base piece; "riverrun" repeated
    stats = vocab.augment_tokenizer(tok, words)
    assert stats == vocab.VocabStats(base_size=base, lexicon_words=3, already_in_base=1, added=2, total=base + 2)
    assert stats.as_dict() == {"base_size": base, "lexicon_words": 3, "already_in_base": 1, "added": 2,
                               "total": base + 2}
    assert vocab.added_words(tok, base) == ["riverrun", "howth"]
    assert tok.get_vocab()["riverrun"] == base and tok.get_vocab()["howth"] == base + 1
    assert tok("riverrun past howth", add_special_tokens=False).input_ids[0] == base


def test_augment_tokenizer_that_adds_nothing_is_an_error(tmp_path):
    tok = vocab.load_base_tokenizer(_tiny_dir(tmp_path))
    with pytest.raises(vocab.VocabError, match=r"adds no token"):
        vocab.augment_tokenizer(tok, ["xo"])


def test_check_tokenizer_matches_model():
    vocab.check_tokenizer_matches_model(32000, 32000, tokenizer_source="a", model_source="b")
    # A padded matrix (Phi-3.5: 32,064 rows) is cut to the tokenizer; only a larger tokenizer is refused.
    vocab.check_tokenizer_matches_model(32011, 32064, tokenizer_source="a", model_source="b")
    with pytest.raises(vocab.VocabError, match=r"tok/dir has 32065 tokens .* model/dir has only 32064 embedding rows"):
        vocab.check_tokenizer_matches_model(32065, 32064, tokenizer_source="tok/dir", model_source="model/dir")


def test_save_tokenizer_round_trip(tmp_path):
    tok = vocab.load_base_tokenizer(_tiny_dir(tmp_path))
    vocab.augment_tokenizer(tok, ["riverrun", "howth"])
    out = vocab.save_tokenizer(tok, tmp_path / "workdir")
    assert out == tmp_path / "workdir" / "tokenizer"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    for reloaded in (vocab.load_base_tokenizer(out), AutoTokenizer.from_pretrained(str(out))):
        assert len(reloaded) == len(tok)
        assert reloaded(_TEXT).input_ids == tok(_TEXT).input_ids
        assert vocab.added_words(reloaded, len(tok) - 2) == ["riverrun", "howth"]


# ---------------------------------------------------------------- subword pieces


def test_subword_piece_ids_drops_a_bare_leading_boundary(tmp_path):
    tok = vocab.load_base_tokenizer(_tiny_dir(tmp_path))
    enc = {w: tok.backend_tokenizer.encode(w, add_special_tokens=False) for w in ("xo", "riverrun")}
    assert enc["xo"].tokens == ["▁", "xo"]  # precondition: no "▁x" merge in the tiny vocab
    assert enc["riverrun"].tokens[0] == "▁ri"
    pieces = vocab.subword_piece_ids(tok, ["xo", "riverrun"])
    assert pieces == [enc["xo"].ids[1:], enc["riverrun"].ids]


# ---------------------------------------------------------------- initialisers


def _gaussian_table(v, d, seed=0):
    """Rows with distinct per-dimension means and spreads, so the checks can tell them apart."""
    rng = np.random.default_rng(seed)
    return (np.linspace(-1, 1, d) + np.linspace(0.5, 2.0, d) * rng.standard_normal((v, d))).astype(np.float32)


def test_init_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"mean_noise, spherical, subword_mean, hewitt"):
        vocab.init_new_rows(np.ones((4, 2), np.float32), 3, "zeros", seed=0)


def test_mean_noise_has_base_mean_and_scaled_std():
    base = _gaussian_table(4000, 6)
    n, scale = 20000, 0.1
    rows = vocab.init_new_rows(base, n, "mean_noise", seed=1, noise_scale=scale)
    assert rows.shape == (n, 6) and rows.dtype == np.float32
    mu, sd = base.mean(0, dtype=np.float64), base.std(0, dtype=np.float64)
    # Sample mean of n draws from N(mu, (scale*sd)^2): standard error scale*sd/sqrt(n); allow 5 SE.
    np.testing.assert_array_less(np.abs(rows.mean(0) - mu), 5 * scale * sd / np.sqrt(n))
    # Sample std has relative standard error ~1/sqrt(2n) = 0.5%; allow 5 SE = 2.5%.
    np.testing.assert_allclose(rows.std(0), scale * sd, rtol=5 / np.sqrt(2 * n))


def test_mean_noise_with_zero_scale_is_the_base_mean():
    base = _gaussian_table(100, 5)
    rows = vocab.init_new_rows(base, 3, "mean_noise", seed=0, noise_scale=0.0)
    # Exact up to the float32 cast of a float64 mean.
    np.testing.assert_allclose(rows, np.broadcast_to(base.mean(0, dtype=np.float64), (3, 5)), rtol=1e-6)


@pytest.mark.parametrize("factor", [1.5, 0.5])
def test_spherical_rows_have_the_stated_norm(factor):
    base = _gaussian_table(500, 16)
    rows = vocab.init_new_rows(base, 4000, "spherical", seed=0, sphere_factor=factor)
    radius = factor * base.std(dtype=np.float64) * np.sqrt(16)
    # Exact by construction; 1e-6 relative covers the float32 storage of the rows.
    np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float64), axis=1), radius, rtol=1e-6)
    # Directions uniform: each coordinate of the mean unit vector has SE 1/sqrt(d*n); allow 5 SE.
    np.testing.assert_array_less(np.abs((rows / radius).mean(0)), 5 / np.sqrt(16 * 4000))


def test_subword_mean_is_the_mean_of_the_piece_rows():
    base = _gaussian_table(50, 4)
    pieces = [[3], [1, 2, 7], [5, 5, 9]]
    rows = vocab.init_new_rows(base, 3, "subword_mean", seed=0, piece_ids=pieces)
    expected = np.stack([base[p].astype(np.float64).mean(0) for p in pieces])
    np.testing.assert_allclose(rows, expected, rtol=1e-6)  # float32 storage of a float64 mean


def test_subword_mean_refuses_missing_or_augmented_ids():
    base = _gaussian_table(50, 4)
    with pytest.raises(ValueError, match=r"needs piece_ids for each of the 2 new rows, got none"):
        vocab.init_new_rows(base, 2, "subword_mean", seed=0)
    with pytest.raises(ValueError, match=r"in \[0, 50\).*before add_tokens"):
        vocab.init_new_rows(base, 1, "subword_mean", seed=0, piece_ids=[[3, 50]])


def test_hewitt_covariance_is_eps_times_base_covariance():
    d, n, eps = 4, 40000, 1e-3
    mix = np.array([[2.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0.5, 0.3, 0], [0.2, 0, 0, 0.1]])
    base = (np.random.default_rng(0).standard_normal((3000, d)) @ mix.T + 3.0).astype(np.float32)
    rows = vocab.init_new_rows(base, n, "hewitt", seed=2, hewitt_eps=eps).astype(np.float64)
    sigma = np.cov(base, rowvar=False, dtype=np.float64)
    # Gaussian sample covariance: SE of entry (i, j) is sqrt((S_ii S_jj + S_ij^2) / n); allow 5 SE.
    se = eps * np.sqrt((np.outer(np.diag(sigma), np.diag(sigma)) + sigma**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(rows, rowvar=False) - eps * sigma), 5 * se)
    np.testing.assert_array_less(np.abs(rows.mean(0) - base.mean(0)), 5 * np.sqrt(eps * np.diag(sigma) / n))


def test_hewitt_with_singular_covariance_stays_in_the_base_span():
    base = _gaussian_table(5, 12)  # 5 rows in 12 dims: Sigma has rank 4
    rows = vocab.init_new_rows(base, 50, "hewitt", seed=0, hewitt_eps=1.0).astype(np.float64)
    centred = base - base.mean(0, dtype=np.float64)
    basis = np.linalg.svd(centred, full_matrices=False)[2][:4]
    offsets = rows - base.mean(0, dtype=np.float64)
    residual = offsets - offsets @ basis.T @ basis
    # Off-span residual is float32 rounding of rows of norm ~5, not sampled noise.
    assert np.abs(residual).max() < 1e-5 * np.abs(offsets).max()
    assert np.abs(offsets).max() > 0.1


@pytest.mark.parametrize("method", ["mean_noise", "spherical", "hewitt"])
def test_init_is_deterministic_for_a_seed(method, monkeypatch):
    monkeypatch.setattr(vocab, "_CHUNK", 3)  # several chunks, with a ragged last one
    base = _gaussian_table(40, 8)
    a = vocab.init_new_rows(base, 10, method, seed=7)
    np.testing.assert_array_equal(a, vocab.init_new_rows(base, 10, method, seed=7))
    assert not np.array_equal(a, vocab.init_new_rows(base, 10, method, seed=8))
    assert len({row.tobytes() for row in a}) == 10  # every chunk drew fresh rows


def test_grow_table_appends_new_rows_after_the_base():
    base = _gaussian_table(30, 4)
    grown = vocab.grow_table(base, 5, "mean_noise", seed=3)
    assert grown.shape == (35, 4) and grown.dtype == np.float32
    np.testing.assert_array_equal(grown[:30], base)
    np.testing.assert_array_equal(grown[30:], vocab.init_new_rows(base, 5, "mean_noise", seed=3))


# ---------------------------------------------------------------- real fixtures


@functools.lru_cache(maxsize=1)
def _real_augmented(shared: pathlib.Path):
    """One augmented TinyLlama tokenizer for all real-fixture tests (augmenting takes ~0.2 s)."""
    tok = vocab.load_base_tokenizer(shared / "tinyllama_tokenizer")
    stats = vocab.augment_tokenizer(tok, vocab.load_lexicon(shared / "wake_lexicon.txt"))
    return tok, stats


def test_real_augmentation_reproduces_the_reference_ids(shared_data):
    tok, stats = _real_augmented(shared_data)
    assert stats == vocab.VocabStats(base_size=32000, lexicon_words=44990, already_in_base=490, added=44500,
                                     total=76500)
    assert len(tok) == 76500
    reference = json.loads((shared_data / "tinyllama_added_tokens.json").read_text(encoding="utf-8"))
    assert len(reference) == 44500
    vocabulary = tok.get_vocab()
    mismatches = {w: (i, vocabulary.get(w)) for w, i in reference.items() if vocabulary.get(w) != i}
    assert not mismatches, f"{len(mismatches)} ids differ, e.g. {list(mismatches.items())[:5]}"
    assert vocab.added_words(tok, 32000) == sorted(reference, key=reference.get)


def test_real_subword_pieces_come_from_the_base_vocabulary(shared_data):
    tok, _ = _real_augmented(shared_data)
    base = vocab.load_base_tokenizer(shared_data / "tinyllama_tokenizer")
    words = vocab.added_words(tok, 32000)
    pieces = vocab.subword_piece_ids(base, words)
    assert len(pieces) == 44500 and max(max(p) for p in pieces) < 32000
    riverrun = base.convert_ids_to_tokens(pieces[words.index("riverrun")])
    assert "".join(riverrun).lstrip("▁") == "riverrun"


def test_real_save_round_trip_tokenizes_the_whole_wake_identically(shared_data, tmp_path):
    tok, _ = _real_augmented(shared_data)
    out = vocab.save_tokenizer(tok, tmp_path)
    reloaded = vocab.load_base_tokenizer(out)
    assert len(reloaded) == 76500
    text = data.read_corpus(shared_data / "finnegans_wake.txt")
    np.testing.assert_array_equal(data.tokenize_corpus(reloaded, text), data.tokenize_corpus(tok, text))
