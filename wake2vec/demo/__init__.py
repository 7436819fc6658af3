"""The embedded demo: a complete Phase 1 run with no download and no user files.

It builds the same kinds of inputs a real run takes and hands them to the real pipeline:

* a base tokenizer trained at run time on the bundled sample text (Llama-like BPE with
  metaspace pieces and byte fallback; wake2vec.demo.tokenizer),
* a small Llama with seeded random weights, written as a HF checkpoint directory and then
  read back through `convert.load_hf`, exactly as TinyLlama would be,
* a lexicon of the sample's coinages chosen by the lexicon builder,
* the bundled sample text as the corpus (original prose written for this project).

`DEMO_PRESET` shrinks the schedule so the whole demo, analysis and generations included,
finishes in a few minutes on a 2-core CPU. Flags given explicitly always win over it.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil

import jax

from wake2vec.models import convert, model
from wake2vec.tokens import lexicon_builder
from wake2vec.config import ModelConfig, TrainConfig

SAMPLE_TEXT = pathlib.Path(__file__).parent / "data" / "sample.txt"
DEMO_TOKENIZER_VOCAB = 1024

# Schedule for the demo; any flag the user sets explicitly overrides its entry here.
DEMO_PRESET = dict(
    seq_len=128,
    batch_size=2,
    grad_accum=2,
    max_steps=600,
    lr=1e-2,
    eval_every=50,
    save_every=100,
    log_every=25,
    keep=2,
    generate_at_end=True,
)


def demo_model_config(vocab_size: int) -> ModelConfig:
    """A small untied Llama with GQA, so the demo exercises the same features as TinyLlama."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


def apply_preset(cfg: TrainConfig, explicitly_set: set[str]) -> TrainConfig:
    """The demo schedule for every field the user did not set."""
    return dataclasses.replace(cfg, **{k: v for k, v in DEMO_PRESET.items() if k not in explicitly_set})


@dataclasses.dataclass(frozen=True)
class DemoSources:
    model_dir: pathlib.Path
    corpus: pathlib.Path
    lexicon: pathlib.Path


def build_sources(workdir: pathlib.Path, seed: int) -> DemoSources:
    """Creates (once) the demo's base model, tokenizer and lexicon under workdir/demo_sources.

    Existing files are reused, so a resumed demo reads the very same frozen body; the
    training launcher checks its content hash like any other source. Each is built under
    a temporary name and renamed into place, so a kill mid-write leaves nothing a later
    run would take for a finished source.
    """
    from wake2vec.demo.tokenizer import train_demo_tokenizer
    from wake2vec.training.workdir import atomic_write_text

    root = workdir / "demo_sources"
    model_dir = root / "base_model"
    lexicon_path = root / "lexicon.txt"
    text = SAMPLE_TEXT.read_text(encoding="utf-8")
    if not model_dir.is_dir():
        staging = root / "base_model.partial"
        shutil.rmtree(staging, ignore_errors=True)
        logging.info("demo: training a %d-piece base tokenizer on the bundled sample", DEMO_TOKENIZER_VOCAB)
        tokenizer = train_demo_tokenizer(text, vocab_size=DEMO_TOKENIZER_VOCAB)
        cfg = demo_model_config(len(tokenizer))
        logging.info("demo: writing a seeded random Llama (%.2f M parameters) to %s", cfg.num_params / 1e6, model_dir)
        params = model.init_params(cfg, jax.random.PRNGKey(seed))
        convert.save_hf(cfg, params, staging, tokenizer=tokenizer)
        staging.rename(model_dir)
    if not lexicon_path.is_file():
        from wake2vec.tokens.vocab import load_base_tokenizer

        tokenizer = load_base_tokenizer(model_dir)
        entries = lexicon_builder.build_lexicon(text, lexicon_builder.piece_counter(tokenizer), min_count=2, min_pieces=3)
        atomic_write_text(lexicon_path, "".join(e.word + "\n" for e in entries))
        logging.info("demo: lexicon of %d coinages from the sample -> %s", len(entries), lexicon_path)
    return DemoSources(model_dir=model_dir, corpus=SAMPLE_TEXT, lexicon=lexicon_path)
