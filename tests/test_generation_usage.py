"""New-token usage in generations: the share of each continuation that is Wake vocabulary.

`new_token_usage` is checked on hand-made ids; `write_generations` on a tiny random model
whose new rows are scaled up so that it does emit them, against counts taken here from the
ids that the decoder itself returns.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from wake2vec.models import generate, model
from wake2vec.tokens import vocab
from wake2vec.analysis import usage as usage_report
from wake2vec.config import ModelConfig
from wake2vec.demo.tokenizer import train_demo_tokenizer

TEXT = """riverrun, past Eve and Adam's, from swerve of shore to bend of bay,
brings us by a commodius vicus of recirculation back to Howth Castle and Environs."""
NEW_WORDS = ["riverrun", "commodius", "recirculation", "Howth", "swerve"]


def test_usage_on_hand_made_ids():
    usage = generate.new_token_usage([5, 100, 101, 100, 3, 150, 99], base_vocab_size=100)
    assert usage == {"generated_tokens": 7, "new_tokens": 4, "share_new": 4 / 7, "distinct_new": 3,
                     "new_ids": [(100, 2), (101, 1), (150, 1)]}  # most used first, ties by id
    assert generate.new_token_usage([1, 2, 3], 100)["share_new"] == 0.0
    empty = generate.new_token_usage([], 100)
    assert empty["share_new"] is None and empty["new_ids"] == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tokenizer = train_demo_tokenizer(TEXT, vocab_size=300)
    base = len(tokenizer)
    vocab.augment_tokenizer(tokenizer, NEW_WORDS)
    cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    params = jax.jit(lambda key: model.init_params(cfg, key))(jax.random.PRNGKey(0))  # one compile, not one per op
    # Longer new rows win more of the tied head's logits, so the model emits new tokens.
    params["embedding"] = params["embedding"].at[base:].multiply(30.0)
    # Two sampled temperatures share one compiled sampler (temperature is traced).
    settings = generate.GenerationSettings(prompt="riverrun, past Eve", temperatures=(0.8, 1.0), max_new_tokens=12)
    workdir = tmp_path_factory.mktemp("run")
    out = generate.write_generations(workdir, cfg, params, tokenizer, settings=settings, base_vocab_size=base,
                                     log=lambda _: None)
    record = json.loads((workdir / generate.GENERATIONS_JSON).read_text(encoding="utf-8"))
    return cfg, params, tokenizer, base, settings, out.read_text(encoding="utf-8"), record, workdir


def test_usage_in_json_and_markdown_matches_the_decoded_ids(run):
    cfg, params, tokenizer, base, settings, markdown, record, _ = run
    assert json.dumps(record, allow_nan=False)  # strict JSON
    prompt_ids = tokenizer(settings.prompt, add_special_tokens=True)["input_ids"]
    assert record["prompt_ids"] == prompt_ids
    all_new = set()
    for temperature, entry in zip(settings.temperatures, record["samples"]):
        assert entry["temperature"] == temperature
        key = generate.sample_key(settings.seed, settings.prompt, temperature, 0)[1]
        decoded = np.asarray(generate.generate(
            cfg, params, [prompt_ids], settings.max_new_tokens, temperature=temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, eos_id=tokenizer.eos_token_id,
            key=key))[0, len(prompt_ids):].tolist()
        eos = decoded.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in decoded else len(decoded)
        ids = decoded[:eos]  # the continuation, its closing eos excluded
        assert entry["generated_ids"] == ids and entry["token_ids"][len(prompt_ids):][:len(ids)] == ids
        new = [i for i in ids if i >= base]
        usage = entry["usage"]
        assert (usage["generated_tokens"], usage["new_tokens"], usage["distinct_new"]) == (len(ids), len(new),
                                                                                         len(set(new)))
        assert usage["share_new"] == len(new) / len(ids)
        assert {row["id"]: row["count"] for row in usage["new_ids"]} == {i: new.count(i) for i in set(new)}
        assert all(row["token"] == tokenizer.convert_ids_to_tokens(row["id"]) for row in usage["new_ids"])
        row = f"| {temperature:g} | {len(ids)} | {len(new)} | {len(new) / len(ids):.1%} | {len(set(new))} |"
        assert row in markdown
        all_new |= set(new)
    assert all_new, "the scaled new rows should make the model emit new tokens; the test would be vacuous"
    assert record["distinct_new_all_temperatures"] == len(all_new)
    assert f"Distinct new tokens over all temperatures: {len(all_new)}." in markdown
    assert f"| new tokens are ids from | {base} |" in markdown


def test_usage_not_counted_without_the_base_size(run, tmp_path):
    cfg, params, tokenizer, _, settings, _, _, _ = run
    out = generate.write_generations(tmp_path, cfg, params, tokenizer, log=lambda _: None,
                                     settings=settings)
    record = json.loads((tmp_path / generate.GENERATIONS_JSON).read_text(encoding="utf-8"))
    assert record["samples"][0]["usage"] is None and record["distinct_new_all_temperatures"] is None
    text = out.read_text(encoding="utf-8")
    assert "share new" not in text and "| new tokens are ids from | not counted" in text
    assert "not counted" in usage_report.generation_usage_headline(tmp_path)


def test_analysis_launcher_headline_reads_the_usage(run, tmp_path):
    record, workdir = run[6], run[7]
    lines = usage_report.generation_usage_headline(workdir).splitlines()
    for line, entry in zip(lines[1:], record["samples"]):
        usage = entry["usage"]
        assert line == (f"  temperature {entry['temperature']:g}: {usage['new_tokens']} of {usage['generated_tokens']} "
                        f"tokens new ({usage['share_new']:.1%}), {usage['distinct_new']} distinct")
    assert lines[-1].endswith(f": {record['distinct_new_all_temperatures']}")
    assert "not found" in usage_report.generation_usage_headline(tmp_path)
