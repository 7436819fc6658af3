"""KV-cache decoding (wake2vec.models.generate) and its launcher (experiments/generate.py).

Greedy decoding is held to transformers' `generate(do_sample=False)` token for token, and to
the real stories260K model's recorded greedy path: any cache, RoPE-offset or masking bug
changes a token within a few steps. The logits stages are held to transformers' own
processors, and sampled tokens are checked against the allowed set recomputed from scratch
with a full (cache-free) forward pass.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.launchers import run_here
from tests.hf_oracle import hf_greedy, hf_llama, save_checkpoint, torch, transformers
from wake2vec.models import convert, generate, model
from wake2vec.tokens import vocab
from wake2vec.demo.tokenizer import train_demo_tokenizer
from experiments import generate as generate_cli

PROMPT_LEN = 7
NEW_TOKENS = 24
# On these models our float32 logits differ from transformers' by ~2e-7 (different
# summation orders); a greedy step whose top-2 gap were that small could legitimately flip,
# so the parity test first checks the random model never comes within 50x of a tie.
TIE_MARGIN = 1e-5


@pytest.mark.parametrize(
    "kv_heads,tied,penalty", [(1, False, 1.0), (2, True, 1.0), (4, False, 1.0), (2, False, 1.3)]
)
def test_greedy_matches_transformers(tmp_path, kv_heads, tied, penalty):
    hf = hf_llama(num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    cfg, params = convert.load_hf(str(save_checkpoint(hf, tmp_path)))
    ids = np.random.default_rng(kv_heads).integers(0, cfg.vocab_size, size=(2, PROMPT_LEN))
    expected, margin = hf_greedy(hf, ids, NEW_TOKENS, repetition_penalty=penalty)
    assert margin > TIE_MARGIN, "random model too close to a tie for an exact comparison; change its seed"
    ours = np.asarray(
        generate.generate(cfg, params, ids, NEW_TOKENS, repetition_penalty=penalty, eos_id=None)
    )
    assert ours.shape == expected.shape == (2, PROMPT_LEN + NEW_TOKENS)
    np.testing.assert_array_equal(ours, expected)


def test_greedy_reproduces_the_stories260k_reference(shared_data):
    cfg, params = convert.load_hf(str(shared_data / "stories260K" / "hf"))
    reference = np.load(shared_data / "stories260K" / "reference_logits.npz")["input_ids"]
    bos = int(reference[0])
    assert bos == cfg.bos_token_id == 1
    ours = np.asarray(generate.generate(cfg, params, [[bos]], 256))
    np.testing.assert_array_equal(ours[0, 1:], reference[1:257])


def test_repetition_penalty_matches_transformers():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(3, 50)).astype(np.float32)  # both signs matter
    ids = rng.integers(0, 50, size=(3, 12))  # repeats within a row count once
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    expected = processor(torch.as_tensor(ids), torch.as_tensor(logits)).numpy()
    ours = np.asarray(generate.apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.7))
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    assert (ours != logits).sum() == seen.sum()  # exactly the seen ids moved


def test_top_k_and_top_p_keep_transformers_allowed_set():
    logits = np.random.default_rng(1).normal(0.0, 2.0, size=(4, 200)).astype(np.float32)
    scores = torch.as_tensor(logits)
    for k in (1, 5, 50, 500):  # 500 > vocab: nothing is removed
        expected = np.isfinite(transformers.TopKLogitsWarper(top_k=k)(None, scores.clone()).numpy())
        values, ids = map(np.asarray, generate.top_k_candidates(jnp.asarray(logits), k))
        ours = np.zeros_like(expected)
        np.put_along_axis(ours, ids, True, axis=1)
        np.testing.assert_array_equal(ours, expected, err_msg=f"top_k={k}")
        assert ids.shape == (4, min(k, 200))
        np.testing.assert_array_equal(values, np.take_along_axis(logits, ids, axis=1))
    for p in (0.05, 0.5, 0.92, 0.999):
        expected = np.isfinite(transformers.TopPLogitsWarper(top_p=p)(None, scores.clone()).numpy())
        ours = np.isfinite(np.asarray(generate.top_p_filter(jnp.asarray(logits), p)))
        np.testing.assert_array_equal(ours, expected, err_msg=f"top_p={p}")
        assert ours.any(axis=-1).all()  # the most likely token always survives


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A small random tied model: its logits are peaked (an embedding dotted with itself)."""
    hf = hf_llama(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=384, seed=3)
    directory = save_checkpoint(hf, tmp_path_factory.mktemp("tied"))
    cfg, params = convert.load_hf(str(directory))
    return directory, cfg, params


def test_sampling_only_emits_tokens_the_filters_allow(tied_model):
    _, cfg, params = tied_model
    settings = dict(temperature=0.9, top_k=8, top_p=0.6, repetition_penalty=1.15)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, PROMPT_LEN))
    tokens = np.array(generate.generate(cfg, params, prompt, 40, seed=5, **settings))  # writable, for torch
    # Recompute every step's allowed set from scratch: a full causal pass, transformers' processors.
    full_logits = torch.from_numpy(np.array(model.forward(cfg, params, jnp.asarray(tokens))))
    processors = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]),
        transformers.TemperatureLogitsWarper(settings["temperature"]),
        transformers.TopKLogitsWarper(settings["top_k"]),
        transformers.TopPLogitsWarper(settings["top_p"]),
    ])
    allowed_sizes = []
    for position in range(PROMPT_LEN, tokens.shape[1]):
        prefix = torch.as_tensor(tokens[:, :position])
        allowed = torch.isfinite(processors(prefix, full_logits[:, position - 1].clone())).numpy()
        assert allowed[np.arange(2), tokens[:, position]].all(), f"disallowed token at position {position}"
        allowed_sizes += allowed.sum(axis=-1).tolist()
    assert max(allowed_sizes) <= settings["top_k"]
    assert max(allowed_sizes) > 1  # some steps really were a draw among several tokens
    greedy = np.asarray(generate.generate(cfg, params, prompt, 40, repetition_penalty=1.15))
    assert (tokens != greedy).any()


def test_sampling_is_deterministic_for_a_seed(tied_model):
    _, cfg, params = tied_model
    prompt = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, PROMPT_LEN))

    def draw(seed, **kwargs):
        return np.asarray(generate.generate(cfg, params, prompt, 20, temperature=1.2, seed=seed, **kwargs))

    np.testing.assert_array_equal(draw(11), draw(11))
    assert (draw(11) != draw(12)).any()
    # Keeping only the best token makes any temperature greedy: checks the filter inside the loop.
    np.testing.assert_array_equal(draw(11, top_k=1), np.asarray(generate.generate(cfg, params, prompt, 20)))


def test_a_row_that_emits_eos_keeps_emitting_it(tied_model):
    _, cfg, params = tied_model
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, PROMPT_LEN))

    def decode(**kwargs):
        # A strong penalty stops the tied random model from repeating one token forever.
        return np.asarray(generate.generate(cfg, params, prompt, NEW_TOKENS, repetition_penalty=2.0, **kwargs))

    free = decode()
    row0, row1 = free[0, PROMPT_LEN:].tolist(), free[1, PROMPT_LEN:].tolist()
    # As eos take a token row 0 first emits mid-way and row 1 never emits.
    stop = next(i for i in range(3, NEW_TOKENS) if row0[i] not in row0[:i] and row0[i] not in row1)
    stopped = decode(eos_id=row0[stop])
    end = PROMPT_LEN + stop + 1
    np.testing.assert_array_equal(stopped[0, :end], free[0, :end])
    assert (stopped[0, end:] == row0[stop]).all() and end < stopped.shape[1]
    np.testing.assert_array_equal(stopped[1], free[1])  # the other row is unaffected


@pytest.mark.parametrize(
    "prompt,new_tokens,kwargs,message",
    [
        ([[]], 4, {}, "at least one token"),
        ([1, 2, 3], 4, {}, r"\(batch, length\)"),
        ([[1] * 1000], 30, {}, "max_position_embeddings=1024"),
        ([[1, 2]], 0, {}, "at least one new token"),
        ([[1, 2]], 4, {"temperature": -0.5}, "temperature"),
        ([[1, 2]], 4, {"top_p": 0.0}, "top_p"),
        ([[1, 2]], 4, {"top_k": -1}, "top_k"),
        ([[1, 2]], 4, {"repetition_penalty": 0.0}, "repetition_penalty"),
        ([[1, 384]], 4, {}, "another tokenizer"),
        ([[1, 2]], 4, {"eos_id": 384}, "eos_id"),
    ],
)
def test_bad_arguments_raise_actionable_errors(tied_model, prompt, new_tokens, kwargs, message):
    _, cfg, params = tied_model
    with pytest.raises(ValueError, match=message):
        generate.generate(cfg, params, prompt, new_tokens, **kwargs)


def test_parse_temperatures():
    assert generate_cli.parse_temperatures("0.5, 0.7,0,1.2") == (0.5, 0.7, 0.0, 1.2)
    for bad, message in [("", "empty entry"), ("0.5,,0.7", "empty entry"), ("0.5,hot", "'hot' is not a number")]:
        with pytest.raises(ValueError, match=message):
            generate_cli.parse_temperatures(bad)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"temperatures": (0.5, -1.0)}, "temperature=-1.0"),
        ({"temperatures": (float("nan"),)}, "temperature=nan"),
        ({"temperatures": ()}, "no temperatures"),
        ({"prompt": "  "}, "prompt is empty"),
        ({"max_new_tokens": 0}, "at least one new token"),
        ({"top_p": 1.5}, "top_p"),
        ({"samples": 0}, "at least one sample"),
    ],
)
def test_generation_settings_refuse_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        generate.GenerationSettings(**changes)


TOKENIZER_TEXT = """riverrun, past Eve and Adam's, from swerve of shore to bend of bay,
brings us by a commodius vicus of recirculation back to Howth Castle and Environs.
Sir Tristram, violer d'amores, fr'over the short sea, had passencore rearrived."""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_demo_tokenizer(TOKENIZER_TEXT, vocab_size=330).save_pretrained(directory)
    return directory


def test_write_generations_demo_uses_the_demo_prompt_and_length(tied_model, tokenizer_dir, tmp_path):
    _, cfg, params = tied_model
    tokenizer = vocab.load_base_tokenizer(tokenizer_dir)
    logged = []
    out = generate.write_generations(tmp_path, cfg, params, tokenizer, step=120, demo=True, log=logged.append)
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "generations.md"
    assert f"```text\n{generate.DEMO_SETTINGS.prompt}\n```" in text.split("## ")[0]
    assert "| max_new_tokens | 128 |" in text and "| checkpoint step | 120 |" in text
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [f"## temperature {t:g}" for t in generate.DEMO_SETTINGS.temperatures]
    assert len(logged) == len(titles)
    for section in text.split("## ")[1:]:
        assert generate.DEMO_SETTINGS.prompt in section  # each continuation starts from the prompt


def test_every_sample_has_its_own_recorded_key_and_a_rerun_repeats_it(tied_model, tokenizer_dir, tmp_path):
    _, cfg, params = tied_model
    tokenizer = vocab.load_base_tokenizer(tokenizer_dir)
    # No top-k / top-p and a mild penalty: the tied model's peaked logits still leave real draws.
    settings = generate.GenerationSettings(prompt="riverrun, past Eve", temperatures=(0, 1.0, 1.2), max_new_tokens=16,
                                           top_k=0, top_p=1.0, samples=2)
    write = lambda out: generate.write_generations(out, cfg, params, tokenizer, settings=settings, log=lambda _: None)  # noqa: E731
    markdown = write(tmp_path / "a")
    record = json.loads((tmp_path / "a" / "generations.json").read_text(encoding="utf-8"))
    drawn = [(s["temperature"], s["sample"]) for s in record["samples"]]
    assert drawn == [(0.0, 0), (1.0, 0), (1.0, 1), (1.2, 0), (1.2, 1)]  # greedy is written once
    assert record["samples"][0]["key"] is None
    sampled = record["samples"][1:]
    assert len({tuple(s["key"]) for s in sampled}) == 4
    # Two temperatures at one seed, and two samples at one temperature, are different draws.
    assert sampled[0]["token_ids"] != sampled[2]["token_ids"] and sampled[0]["text"] != sampled[2]["text"]
    assert sampled[0]["token_ids"] != sampled[1]["token_ids"]
    for s in sampled:
        folded, key = generate.sample_key(settings.seed, settings.prompt, s["temperature"], s["sample"])
        assert s["key_fold"] == folded and s["key"] == np.asarray(jax.random.key_data(key)).tolist()
        # The recorded key alone redraws the recorded sample.
        again = generate.generate(cfg, params, [record["prompt_ids"]], 16, temperature=s["temperature"], top_k=0,
                                  repetition_penalty=settings.repetition_penalty, eos_id=tokenizer.eos_token_id,
                                  key=jnp.asarray(s["key"], jnp.uint32))
        assert np.asarray(again)[0, : len(s["token_ids"])].tolist() == s["token_ids"]
        assert f"Key: `fold_in(PRNGKey(0), {folded})` = `{s['key']}`" in markdown.read_text(encoding="utf-8")
    assert "## temperature 1.2, sample 2" in markdown.read_text(encoding="utf-8")
    write(tmp_path / "b")
    for name in ("generations.md", "generations.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _run_cli(capsys, *args):
    return run_here(capsys, "generate", *args)


def test_cli_writes_one_section_per_temperature(tied_model, tokenizer_dir, tmp_path, capsys):
    model_dir, cfg, params = tied_model
    tokenizer = vocab.load_base_tokenizer(tokenizer_dir)
    prompt = "riverrun, past Eve and Adam's,"
    result = _run_cli(
        capsys,
        f"--workdir={tmp_path / 'run'}", f"--model={model_dir}", f"--tokenizer={tokenizer_dir}",
        "--temperatures=0,0.8", "--max_new_tokens=12", f"--prompt={prompt}",
    )
    assert result.returncode == 0, result.stderr
    assert "temperature 0 (greedy):" in result.stdout and "temperature 0.8:" in result.stdout
    text = (tmp_path / "run" / "generations.md").read_text(encoding="utf-8")
    for line in ("| top_k | 50 |", "| top_p | 0.92 |", "| repetition_penalty | 1.15 |", "| seed | 0 |",
                 "| checkpoint step | n/a |", "| max_new_tokens | 12 |"):
        assert line in text
    assert text.count("\n## temperature ") == 2
    # The greedy section holds exactly what the library decodes with the study's settings.
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    greedy = generate.generate(cfg, params, [ids], 12, repetition_penalty=1.15, eos_id=tokenizer.eos_token_id)
    decoded = tokenizer.decode(np.asarray(greedy)[0].tolist(), skip_special_tokens=True)
    greedy_section = text.split("## temperature 0 (greedy)")[1].split("## temperature 0.8")[0]
    assert f"```text\n{decoded}\n```" in greedy_section
    assert decoded.startswith(prompt)


@pytest.mark.parametrize(
    "flag,message", [("--temperatures=0.5,warm", "'warm' is not a number"), ("--temperatures=0.5,-2", "temperature=-2")]
)
def test_cli_rejects_bad_temperatures_before_loading(tmp_path, flag, message, capsys):
    result = _run_cli(capsys, f"--workdir={tmp_path}", f"--model={tmp_path / 'absent'}", flag)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "generations.md").exists()


def test_cli_decodes_a_trained_run_from_its_workdir(tmp_path, capsys):
    # The smallest demo run that leaves a committed checkpoint and the augmented tokenizer.
    train = run_here(capsys, "train", f"--workdir={tmp_path}", "--seq_len=32", "--batch_size=2", "--grad_accum=1",
                     "--max_steps=2", "--save_every=2", "--eval_every=2", "--eval_blocks=2", "--analyze=false",
                     "--generate_at_end=false")
    assert train.returncode == 0, train.stderr[-3000:]
    result = _run_cli(capsys, f"--workdir={tmp_path}", "--temperatures=0", "--max_new_tokens=16")
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "generations.md").read_text(encoding="utf-8")
    assert f"| model | run {tmp_path} |" in text and "| checkpoint step | 2 |" in text
    continuation = text.split("## temperature 0 (greedy)\n\n```text\n")[1].split("\n```")[0]
    assert continuation.startswith(generate.STUDY_PROMPT) and len(continuation) > len(generate.STUDY_PROMPT)
