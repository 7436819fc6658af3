"""Tests for wake2vec.training.data: corpus reading, cached tokenization, blocks, split, batches."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from wake2vec.training import data
from wake2vec.tokens import vocab
from wake2vec.training import workdir as records


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Llama's normalizer and a BOS post-processor."""
    words = ["<unk>", "<s>", "</s>", "▁riverrun", "▁past", "▁eve", "▁and", "▁adams", "\n", "▁"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("▁", "merged_with_next"), pre_tokenizers.Split("\n", "isolated")]
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


def _write(tmp_path: pathlib.Path, name: str, content: bytes) -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------- reading


def test_read_corpus_bom_newlines_and_nfc(tmp_path):
    path = _write(tmp_path, "c.txt", "\ufeffriverrun, past\r\nBre\u0301kkek\rend".encode("utf-8"))
    assert data.read_corpus(path) == "riverrun, past\nBr\u00e9kkek\nend"


@pytest.mark.parametrize("content", [b"", b" \n\n\t"])
def test_read_corpus_empty_is_an_error(tmp_path, content):
    path = _write(tmp_path, "empty.txt", content)
    with pytest.raises(data.CorpusError, match=r"corpus .*empty\.txt is empty"):
        data.read_corpus(path)


def test_read_corpus_missing_is_an_error(tmp_path):
    with pytest.raises(data.CorpusError, match=r"corpus file .*wake\.txt does not exist"):
        data.read_corpus(tmp_path / "wake.txt")


def test_read_corpus_non_utf8_names_file_and_line(tmp_path):
    path = _write(tmp_path, "latin1.txt", "one\ntwo\nthree\nBr\u00e9kkek\n".encode("latin-1"))
    with pytest.raises(data.CorpusError, match=r"latin1\.txt:4: corpus is not valid UTF-8 \(byte 0xe9"):
        data.read_corpus(path)


def test_read_corpus_strips_gutenberg_banners(tmp_path):
    text = (
        "The Project Gutenberg eBook of X\nlicence\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nriverrun, past Eve\nand Adam's\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    path = _write(tmp_path, "pg.txt", text.encode("utf-8"))
    assert data.read_corpus(path) == "riverrun, past Eve\nand Adam's"
    assert data.read_corpus(path, strip_banners=False) == text


def test_read_corpus_without_banners_is_unchanged(tmp_path):
    text = "  riverrun, past Eve\n*** not a banner ***\n"
    assert data.read_corpus(_write(tmp_path, "c.txt", text.encode("utf-8"))) == text


def test_read_corpus_only_banners_is_an_error(tmp_path):
    banners = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n"
    path = _write(tmp_path, "pg.txt", banners.encode("utf-8"))
    with pytest.raises(data.CorpusError, match=r"pg\.txt has no text left after banner stripping"):
        data.read_corpus(path)


def test_read_corpus_start_marker(tmp_path):
    path = _write(tmp_path, "c.txt", b"front matter\nriverrun, past Eve\n")
    assert data.read_corpus(path, start_marker="riverrun") == "riverrun, past Eve\n"
    with pytest.raises(data.CorpusError, match=r"start marker 'Howth' does not occur in corpus .*c\.txt"):
        data.read_corpus(path, start_marker="Howth")


# ---------------------------------------------------------------- tokenization and cache


def test_tokenize_corpus_whole_text_without_special_tokens():
    tok = _word_tokenizer()
    ids = data.tokenize_corpus(tok, "riverrun past\neve")
    assert ids.dtype == np.int32
    # One string: "▁" is prepended once, so "eve" after the newline is the unknown bare
    # "eve" (0), not "▁eve" (5) as line-by-line tokenization would give; and no BOS (1).
    assert ids.tolist() == [3, 4, 8, 0]
    assert tok("riverrun past\neve").input_ids[0] == 1  # the BOS the call must leave out


def test_tokenize_corpus_cache_is_used_and_keyed(tmp_path):
    tok = _word_tokenizer()
    first = data.tokenize_corpus(tok, "riverrun past eve", cache_dir=tmp_path)
    (cached,) = tmp_path.glob("corpus_tokens_*.npy")
    assert not list(tmp_path.glob("*.tmp*"))
    np.testing.assert_array_equal(np.load(cached), first)
    # Plant a sentinel: a second call must return it, i.e. read the cache, not re-tokenize.
    sentinel = np.array([7, 7, 7], dtype=np.int32)
    np.save(cached, sentinel)
    np.testing.assert_array_equal(data.tokenize_corpus(tok, "riverrun past eve", cache_dir=tmp_path), sentinel)
    # Other text, or the same text under an augmented tokenizer, must miss the cache.
    data.tokenize_corpus(tok, "riverrun and eve", cache_dir=tmp_path)
    tok.add_tokens(["eve"])
    augmented = data.tokenize_corpus(tok, "riverrun past eve", cache_dir=tmp_path)
    assert augmented.tolist() == [3, 4, 10]
    assert len(list(tmp_path.glob("corpus_tokens_*.npy"))) == 3


# ---------------------------------------------------------------- blocks and split


def test_make_blocks_drops_the_tail():
    blocks = data.make_blocks(np.arange(10), 3)
    assert blocks.dtype == np.int32
    np.testing.assert_array_equal(blocks, np.arange(9).reshape(3, 3))


def test_make_blocks_corpus_shorter_than_one_block():
    with pytest.raises(data.CorpusError, match=r"has 100 tokens, fewer than one block of seq_len=256.*--seq_len=100"):
        data.make_blocks(np.arange(100), 256)


def test_split_blocks_reference_counts_in_text_order():
    blocks = np.arange(1408)[:, None]
    train, val = data.split_blocks(blocks)
    assert (len(train), len(val)) == (1267, 141)
    np.testing.assert_array_equal(np.concatenate([train, val]), blocks)


def test_split_blocks_shuffle_is_seeded_permutation():
    blocks = np.arange(100)[:, None]
    train, val = data.split_blocks(blocks, 0.2, shuffle_seed=3)
    again = data.split_blocks(blocks, 0.2, shuffle_seed=3)
    np.testing.assert_array_equal(train, again[0])
    assert (len(train), len(val)) == (80, 20)
    order = np.concatenate([train, val])[:, 0]
    assert sorted(order.tolist()) == list(range(100)) and not np.array_equal(order, np.arange(100))


def test_split_blocks_without_validation():
    train, val = data.split_blocks(np.arange(5)[:, None], 0.0)
    assert (len(train), len(val)) == (5, 0)


def test_split_blocks_too_few_blocks():
    with pytest.raises(data.CorpusError, match=r"1 block\(s\) cannot be split"):
        data.split_blocks(np.arange(1)[:, None], 0.1)
    with pytest.raises(data.CorpusError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        data.split_blocks(np.arange(10)[:, None], 1.0)


def test_check_seq_len():
    data.check_seq_len(2048, 2048, "TinyLlama")
    with pytest.raises(data.CorpusError, match=r"seq_len=4096 exceeds max_position_embeddings=2048 of TinyLlama"):
        data.check_seq_len(4096, 2048, "TinyLlama")
    with pytest.raises(data.CorpusError, match=r"seq_len=1 is too short"):
        data.check_seq_len(1, 2048, "TinyLlama")


def test_corpus_stats_as_dict():
    stats = data.CorpusStats(corpus_tokens=360623, train_blocks=1267, val_blocks=141, seq_len=256)
    assert stats.as_dict() == {"corpus_tokens": 360623, "train_blocks": 1267, "val_blocks": 141, "seq_len": 256}


# ---------------------------------------------------------------- batches


def test_train_batch_is_a_pure_function_of_seed_and_step():
    blocks = np.arange(50)[:, None] * np.ones((1, 4), dtype=np.int32)
    late = data.train_batch(blocks, 9, seed=5, batch_size=2, grad_accum=3)  # "resumed" first
    early = data.train_batch(blocks, 0, seed=5, batch_size=2, grad_accum=3)
    assert early.shape == (3, 2, 4) and early.dtype == np.int32
    np.testing.assert_array_equal(late, data.train_batch(blocks, 9, seed=5, batch_size=2, grad_accum=3))
    np.testing.assert_array_equal(early, data.train_batch(blocks, 0, seed=5, batch_size=2, grad_accum=3))
    assert not np.array_equal(early, data.train_batch(blocks, 0, seed=6, batch_size=2, grad_accum=3))


def test_train_batch_epochs_visit_every_block_once():
    n = 10  # with 2 x 3 = 6 samples per step, epochs end mid-step: steps straddle epoch boundaries
    blocks = np.arange(n)[:, None]
    samples = np.concatenate(
        [data.train_batch(blocks, s, seed=0, batch_size=2, grad_accum=3).ravel() for s in range(5)]
    )  # 30 samples = 3 epochs
    epochs = samples.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh order each epoch


def test_eval_batches_in_order_with_a_smaller_last_batch():
    val = np.arange(7)[:, None]
    batches = list(data.eval_batches(val, 3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), val)
    assert [b[:, 0].tolist() for b in data.eval_batches(val, 2, max_blocks=3)] == [[0, 1], [2]]


# ---------------------------------------------------------------- real fixtures


def test_real_corpus_reproduces_the_reference_blocks(shared_data, tmp_path):
    tok = vocab.load_base_tokenizer(shared_data / "tinyllama_tokenizer")
    vocab.augment_tokenizer(tok, vocab.load_lexicon(shared_data / "wake_lexicon.txt"))
    text = data.read_corpus(shared_data / "finnegans_wake.txt", start_marker="riverrun")
    assert text == data.read_corpus(shared_data / "finnegans_wake.txt")  # the file already starts there
    ids = data.tokenize_corpus(tok, text, cache_dir=tmp_path)
    assert ids.size == 360623
    assert int((ids >= 32000).sum()) == 41723
    # PROVENANCE's ids sha256 is over the ids as little-endian int32 bytes.
    assert hashlib.sha256(ids.astype("<i4").tobytes()).hexdigest().startswith("06c2944b0e851f00")
    blocks = data.make_blocks(ids, 256)
    train, val = data.split_blocks(blocks, 0.1)
    assert (len(blocks), len(train), len(val)) == (1408, 1267, 141)
    np.testing.assert_array_equal(data.tokenize_corpus(tok, text, cache_dir=tmp_path), ids)  # cache hit


def test_npy_sha256_is_the_hash_of_the_file_np_save_writes(tmp_path):
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.asfortranarray(np.ones((5, 3))), np.zeros(0)):
        np.save(tmp_path / "a.npy", array)
        assert records.npy_sha256(array) == records.file_sha256(tmp_path / "a.npy")


def test_a_non_writer_process_never_reads_embeddings_pre_the_writer_has_not_written(tmp_path, monkeypatch):
    """The multi-host race: process 1 used to hash embeddings_pre.npy before process 0 wrote it."""
    from wake2vec.training import hosts
    from wake2vec.phases import prepare

    table = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    monkeypatch.setattr(hosts, "is_writer", lambda: False)
    digest = prepare._embeddings_pre(tmp_path, table, None, resumed=False)
    assert not (tmp_path / prepare.EMBEDDINGS_PRE).exists()
    monkeypatch.setattr(hosts, "is_writer", lambda: True)
    assert prepare._embeddings_pre(tmp_path, table, None, resumed=False) == digest
    assert records.file_sha256(tmp_path / prepare.EMBEDDINGS_PRE) == digest
