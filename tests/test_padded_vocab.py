"""A base matrix with more rows than its tokenizer has tokens (Qwen2.5, Phi-3.5).

Qwen2.5-14B's matrix has 152,064 rows for 151,665 tokens. New tokens take ids from
len(tokenizer) on, so in the study the first 399 Wake ids fell on padding rows that no
initialiser wrote and that never trained. wake2vec cuts the matrix to the tokenizer before
growing it (convert.drop_padding_rows): every new row, whatever its id, is initialised from
the real base rows and trains, and the grown table has the shape and base rows of
transformers' resize_token_embeddings(len(tokenizer)).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tests.hf_oracle import hf_family, torch, transformers
from wake2vec.models import convert
from wake2vec.tokens import lexicon_builder, vocab
from wake2vec.training import optim, train
from wake2vec.phases import prepare
from wake2vec.config import TrainConfig
from wake2vec.demo import SAMPLE_TEXT
from wake2vec.demo.tokenizer import train_demo_tokenizer

PADDING = 37
PADDING_VALUE = 50.0  # far outside the base cloud, so a padding row reaching any statistic shows


def _padded_source(tmp_path):
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    tokenizer = train_demo_tokenizer(text, vocab_size=400)
    base = len(tokenizer)
    config = hf_family("qwen2").config.to_dict()
    config["vocab_size"] = base + PADDING
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config.from_dict(config)).eval()
    with torch.no_grad():
        hf.model.embed_tokens.weight[base:] = PADDING_VALUE
    source = tmp_path / "source"
    hf.save_pretrained(source)
    tokenizer.save_pretrained(str(source))
    entries = lexicon_builder.build_lexicon(text, lexicon_builder.piece_counter(tokenizer), min_count=2, min_pieces=3)
    words = [e.word for e in entries]
    lexicon = tmp_path / "lexicon.txt"
    lexicon.write_text("".join(w + "\n" for w in words), encoding="utf-8")
    return hf, base, source, lexicon


def test_new_rows_in_the_padding_range_are_initialised_trained_and_exported(tmp_path):
    hf, base, source, lexicon = _padded_source(tmp_path)
    cfg = TrainConfig(workdir=str(tmp_path / "run"), model=str(source), corpus=str(SAMPLE_TEXT), lexicon=str(lexicon),
                      seq_len=32, max_steps=0, mask_base_rows=True, optimizer="adamw", clip_norm=0.0)
    run = prepare.prepare(cfg)
    body = prepare.read_frozen_body(source, "float32")  # --max_steps=0 prepares without reading it
    stats, table = run.vocab_stats, run.trainable["embedding"]
    assert stats.base_size == base and stats.added > PADDING  # new ids both inside and past the old padding
    assert table.shape == (base + stats.added, hf.config.hidden_size) and run.model_cfg.vocab_size == table.shape[0]

    source_table = hf.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(table[:base], source_table[:base])
    # Every new row comes from the real base rows' statistics: the padding rows never enter.
    expected_new = vocab.init_new_rows(source_table[:base], stats.added, cfg.init, seed=cfg.seed,
                                       noise_scale=cfg.init_noise_scale)
    np.testing.assert_array_equal(table[base:], expected_new)
    assert np.abs(table).max() < PADDING_VALUE / 10

    # One masked step: every new row moves (the tied table is also the head, so each row
    # gets a gradient), ids inside the old padding range included; no base row does.
    tx = optim.make_optimizer(dataclasses.replace(cfg, lr=1e-2, warmup_ratio=0.0), stats.base_size)
    step = jax.jit(train.make_train_step(tx, lambda _: 1e-2, train.StepSettings(run.model_cfg, loss_chunk=64)))
    trainable = jax.tree_util.tree_map(jnp.asarray, run.trainable)
    frozen = jax.tree_util.tree_map(jnp.asarray, body)
    state, _ = step(train.init_state(trainable, frozen, tx), frozen, jnp.asarray(run.train_blocks[None, :2]))
    moved = np.abs(np.asarray(state.trainable["embedding"]) - table).max(axis=1)
    assert np.all(moved[:base] == 0) and np.all(moved[base:] > 0)

    # Export: the shape and base rows transformers' own resize gives the source model.
    trained = {**body, "embedding": np.asarray(state.trainable["embedding"])}
    out = convert.save_hf(run.model_cfg, trained, tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    hf.resize_token_embeddings(len(run.tokenizer))
    resized = hf.model.embed_tokens.weight.detach().numpy()
    got = exported.model.embed_tokens.weight.detach().numpy()
    assert got.shape == resized.shape == (len(run.tokenizer), hf.config.hidden_size)
    assert exported.config.vocab_size == hf.config.vocab_size == len(run.tokenizer)
    np.testing.assert_array_equal(got[:base], resized[:base])
