"""Bits per character against the base model (wake2vec.phases.base_cost): the base model's nats
against transformers' torch Llama on the same characters, the character and byte counts, and
the figures' record and cache in a real demo run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.test_train_p1 import launch, read_jsonl
from wake2vec.config import TrainConfig
from wake2vec.phases import base_cost, prepare
from wake2vec.training import train


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo as it runs: its table tied, while its checkpoint ships an untied head, which the base model keeps."""
    cfg = TrainConfig(model="demo", workdir=str(tmp_path_factory.mktemp("bpc")), seq_len=32, eval_blocks=4, max_steps=1)
    prepared = prepare.prepare(cfg)
    return cfg, prepared, base_cost.setup(prepared, cfg)


def test_base_nats_match_transformers_llama_on_the_same_characters(demo_run):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, prepared, setup = demo_run
    settings = train.StepSettings(prepared.model_cfg, remat="none", loss_chunk=64)
    nats = base_cost.score_base(prepared.frozen, setup.base, setup.spans, settings, batch=3)

    model_dir = prepared.record["model_source"]
    reference = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    assert not reference.config.tie_word_embeddings  # so the base model must be scored with the shipped head
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # Each validation block's characters, from the injected tokenizer's offsets of the whole text
    # (the split is in text order: validation block b is corpus block len(train_blocks) + b).
    full = prepared.tokenizer(prepared.corpus_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    total, words = 0.0, np.zeros(2)
    for b, (ids, weights) in enumerate(zip(setup.spans.base_ids, setup.spans.base_weights)):
        first = (len(prepared.train_blocks) + b) * cfg.seq_len
        chars = prepared.corpus_text[full[first][0]:full[first + cfg.seq_len - 1][1]]
        ref_ids = tokenizer(chars, add_special_tokens=False)["input_ids"]
        real = int(weights[:, 0].sum()) + 1  # every token after the first is scored
        assert list(ids[:real]) == ref_ids and not ids[real:].any()
        with torch.no_grad():
            logits = reference(torch.tensor([ref_ids])).logits[0, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits, torch.tensor(ref_ids[1:]), reduction="none").numpy()
        total += float(losses.sum())
        words += (losses[:, None] * weights[:real - 1, 1:]).sum(0)
    assert words.all()  # the demo's validation blocks hold both seen and unseen Wake words
    # fp32 against fp32 over ~150 predictions of ~7 nats: summation order alone moves ~1e-5 relative.
    np.testing.assert_allclose(nats, [total, *words], rtol=2e-5)


def test_characters_and_bytes_are_counted_from_each_first_tokens_end(demo_run):
    cfg, prepared, setup = demo_run
    text = prepared.corpus_text
    full = prepared.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    base_tokenizer = prepared.base_tokenizer
    run_chars = run_bytes = base_chars = base_bytes = 0
    for b in range(cfg.eval_blocks):
        first = (len(prepared.train_blocks) + b) * cfg.seq_len
        start, scored_from, end = full[first][0], full[first][1], full[first + cfg.seq_len - 1][1]
        run_chars += len(text[scored_from:end])
        run_bytes += len(text[scored_from:end].encode("utf-8"))
        base_first_end = start + base_tokenizer(text[start:end], add_special_tokens=False,
                                                return_offsets_mapping=True)["offset_mapping"][0][1]
        base_chars += len(text[base_first_end:end])
        base_bytes += len(text[base_first_end:end].encode("utf-8"))
    spans = setup.spans
    assert (spans.run_chars, spans.run_bytes, spans.base_chars, spans.base_bytes) == (run_chars, run_bytes, base_chars, base_bytes)
    assert 0 < spans.run_chars <= spans.run_bytes


@pytest.mark.slow
def test_every_eval_reports_the_base_comparison_and_the_cache_is_reused_then_rebuilt(tmp_path):
    flags = ("--max_steps=2", "--eval_every=1", "--save_every=2")
    first = launch(tmp_path, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "scored the base model" in first.stderr
    cache = json.loads((tmp_path / base_cost.CACHE).read_text())
    evals = [e for e in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in e]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert all(math.isfinite(e[k]) for k in ("val_nats_per_char", "val_bits_per_byte", "delta_nats_per_char",
                                                 "delta_bits_per_byte", "val_word_nats_seen", "base_word_nats_seen"))
        assert e["delta_nats_per_char"] == e["val_nats_per_char"] - cache["figures"]["base_nats_per_char"]
        assert e["base_bits_per_byte"] == cache["figures"]["base_bits_per_byte"]
        # One nat is 1 / ln 2 bits, and a character is at least one byte. The two sides are equal when every
        # character is one byte, and then differ only in the order of the two divisions: a few ulps, hence 1e-12.
        assert e["val_bits_per_byte"] <= e["val_nats_per_char"] / math.log(2) * (1 + 1e-12)
        assert e["word_occurrences_seen"] > 0
    header = (tmp_path / "loss_table.md").read_text().splitlines()[0]
    assert "Val nats/char (base; Δ) | Val bits/byte (base; Δ) | Wake word nats, seen (base; n)" in header

    resumed = launch(tmp_path, *flags)  # the same command again: nothing to train, the cache read
    assert resumed.returncode == 0 and "base model costs read from" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((tmp_path / base_cost.CACHE).read_text()) == cache

    fewer = launch(tmp_path, *flags, "--eval_blocks=2", "--allow_config_change")  # other blocks: rescored
    assert fewer.returncode == 0 and "scored the base model" in fewer.stderr, fewer.stderr[-3000:]
    assert json.loads((tmp_path / base_cost.CACHE).read_text())["key"] != cache["key"]


def test_loss_table_cells_show_the_run_the_base_and_the_difference(tmp_path):
    from wake2vec.training import workdir

    event = {"step": 3, "val_loss": 2.0, "val_nats_per_char": 1.25, "base_nats_per_char": 1.5, "val_bits_per_byte": 1.75,
             "base_bits_per_byte": 1.5, "val_word_nats_seen": 10.0, "base_word_nats_seen": 12.5, "word_occurrences_seen": 1234,
             "val_word_nats_unseen": None, "base_word_nats_unseen": None, "word_occurrences_unseen": 0}
    workdir.write_loss_table(tmp_path, [event])
    row = (tmp_path / workdir.LOSS_TABLE).read_text().splitlines()[2]
    assert row.endswith("| 1.2500 (1.5000; Δ -0.2500) | 1.7500 (1.5000; Δ +0.2500) | 10.0000 (12.5000; 1,234) | – |")
