"""The demo tokenizer: Llama 2's layout, lossless round trips, determinism, save and reload."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import tokenizers
import transformers

from wake2vec.demo import tokenizer as demo_tokenizer

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "wake2vec" / "demo" / "data" / "sample.txt"

# Lines with accents, inner apostrophes and hyphens, runs of spaces, a newline, and characters
# the sample never uses (CJK, an emoji, a German sharp s), which must go through byte fallback.
ROUND_TRIP_TEXTS = [
    "Riverrunning, the Liffeyling came down again from the hills of Mistomorrow,",
    "Kroákkak-kroákkak! Kwéekwee-kwíkkery! o'er-the-weir, the château-de-chaff.",
    "  two  leading spaces, a trailing one ",
    "line one\nline two",
    "Straße 川 🌊 <0x41> (1132) — done.",
]


@pytest.fixture(scope="module")
def sample_text() -> str:
    return SAMPLE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tok(sample_text) -> transformers.PreTrainedTokenizerFast:
    return demo_tokenizer.train_demo_tokenizer(sample_text, vocab_size=1024)


def _fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def test_vocab_has_llama_ids(tok):
    vocab = tok.get_vocab()
    assert len(vocab) == 1024
    assert (vocab["<unk>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert [vocab[f"<0x{b:02X}>"] for b in range(256)] == list(range(3, 259))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)


def test_pipeline_is_llama2_layout(tok):
    pipeline = json.loads(tok.backend_tokenizer.to_str())
    assert pipeline["pre_tokenizer"] is None
    assert [n["type"] for n in pipeline["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert [d["type"] for d in pipeline["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert pipeline["model"]["byte_fallback"] is True


def test_pieces_never_span_words_or_punctuation(tok):
    for piece in tok.get_vocab():
        if piece.startswith("<"):
            continue
        assert "▁" not in piece[1:], piece
        if len(piece) > 1:
            assert all(ch.isalpha() or ch == "▁" for ch in piece), piece


def test_dropping_the_training_pre_tokenizer_changes_no_segmentation(tok, sample_text):
    # The module's claim: learned merges never span a boundary of the training
    # pre-tokenizer, so the Llama layout (no pre-tokenizer) segments exactly as training did.
    with_split = tokenizers.Tokenizer.from_str(tok.backend_tokenizer.to_str())
    with_split.pre_tokenizer = demo_tokenizer._training_pre_tokenizer()
    for line in sample_text.splitlines() + ROUND_TRIP_TEXTS:
        assert with_split.encode(line, add_special_tokens=False).ids == tok.encode(line, add_special_tokens=False)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_inverts_encode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_whole_sample_round_trips(tok, sample_text):
    assert tok.decode(tok.encode(sample_text, add_special_tokens=False)) == sample_text


def test_unseen_characters_use_byte_tokens(tok):
    pieces = tok.convert_ids_to_tokens(tok.encode("川", add_special_tokens=False))
    assert pieces == ["▁", "<0xE5>", "<0xB7>", "<0x9D>"]
    assert tok.unk_token_id not in tok.encode(ROUND_TRIP_TEXTS[-1])


def test_bos_only_with_special_tokens(tok):
    with_special = tok.encode("riverrunning")
    without = tok.encode("riverrunning", add_special_tokens=False)
    assert with_special == [tok.bos_token_id] + without
    assert tok.bos_token_id not in without and tok.eos_token_id not in with_special


def test_coinages_split_into_several_pieces(tok):
    assert len(tok.tokenize("Krakkadonnaboomtorrentonnerthunorgromblesquallopurrumbolóuch")) > 10
    assert len(tok.tokenize("penmanshipwreck")) >= 3


def test_same_text_same_tokenizer_across_processes(tok, sample_text):
    assert _fingerprint(demo_tokenizer.train_demo_tokenizer(sample_text)) == _fingerprint(tok)
    # A fresh interpreter has different hash seeds: training must not depend on them.
    script = (
        "import hashlib, pathlib\n"
        "from wake2vec.demo import tokenizer as demo_tokenizer\n"
        f"text = pathlib.Path({str(SAMPLE)!r}).read_text(encoding='utf-8')\n"
        "tok = demo_tokenizer.train_demo_tokenizer(text)\n"
        "print(hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert result.stdout.strip() == _fingerprint(tok)


def test_save_pretrained_reloads_identically(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    reloaded = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert _fingerprint(reloaded) == _fingerprint(tok)
    assert reloaded.get_vocab() == tok.get_vocab()
    assert reloaded.special_tokens_map == tok.special_tokens_map
    for text in ROUND_TRIP_TEXTS:
        assert reloaded.encode(text) == tok.encode(text)
        assert reloaded.decode(reloaded.encode(text), skip_special_tokens=True) == text


def test_different_text_gives_a_different_tokenizer(tok, sample_text):
    other = demo_tokenizer.train_demo_tokenizer(sample_text[: len(sample_text) // 2])
    assert _fingerprint(other) != _fingerprint(tok)


def test_refuses_a_vocab_without_room_for_merges(sample_text):
    with pytest.raises(ValueError, match="leaves no room for merges"):
        demo_tokenizer.train_demo_tokenizer(sample_text, vocab_size=300)


def test_refuses_empty_text():
    with pytest.raises(ValueError, match="empty text"):
        demo_tokenizer.train_demo_tokenizer(" \n\n ")
