"""experiments/export_hf and runs.load_params: a trained run, opened by transformers.

Each workdir is what a run leaves: a tiny HF source written by convert.save_hf, a word-level
tokenizer grown with vocab.augment_tokenizer, config.json, and one checkpoint whose table
(and head) differ from the source's everywhere, with padding rows full of garbage, so a
row taken from the wrong place or a padding row left in shows up in the logits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from experiments import export_hf
from tests.hf_oracle import torch, transformers
from tests.launchers import run_here
from wake2vec.training import checkpoint, optim, train
from wake2vec.phases import runs
from wake2vec.models import convert, model
from wake2vec.tokens import vocab
from wake2vec.config import ModelConfig, TrainConfig

BASE_WORDS = ["[UNK]"] + [f"w{i}" for i in range(59)]
LEXICON = ["riverrun", "w3", "commodius", "vicus"]  # w3 is already a base token
ROWS = 128  # padded table rows
STEP = 7


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(BASE_WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def make_workdir(root: pathlib.Path, *, source_tied: bool, run_tied: bool, bf16_source: bool = False) -> pathlib.Path:
    """A finished run's workdir (config.json, tokenizer/, checkpoints/STEP) over a fresh source.

    `bf16_source` makes the source like TinyLlama's: bf16 weights, a list eos_token_id and a
    field (pad_token_id) that ModelConfig does not model.
    """
    source_cfg = ModelConfig(
        vocab_size=len(BASE_WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=source_tied,
    )
    source_params = model.init_params(source_cfg, jax.random.key(0))
    if bf16_source:
        source_params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), source_params)
    source = convert.save_hf(source_cfg, source_params, root / "source")
    if bf16_source:
        hf_config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": [2, 5], "pad_token_id": 0}))
    workdir = root / "run"
    workdir.mkdir()
    tokenizer = _tokenizer()
    stats = vocab.augment_tokenizer(tokenizer, LEXICON)
    vocab.save_tokenizer(tokenizer, workdir)

    rng = np.random.default_rng(1)
    dim = source_cfg.hidden_size
    table = rng.normal(0, 0.05, (ROWS, dim)).astype(np.float32)
    table[stats.total:] = 1e3  # padding rows: never tokens
    trainable = {"embedding": table}
    if not run_tied:
        head = rng.normal(0, 0.05, (dim, ROWS)).astype(np.float32)
        head[:, stats.total:] = 1e3
        trainable["lm_head"] = {"kernel": head}
    _, frozen_params = convert.load_hf(str(source), as_numpy=True)
    _, frozen = optim.split_params(frozen_params)
    train_cfg = TrainConfig(tie_embeddings=run_tied)
    tx = optim.make_optimizer(train_cfg, stats.base_size)
    state = train.init_state(jax.tree_util.tree_map(np.asarray, trainable), frozen, tx)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), keep=2, async_save=False)
    ckpt.save(state.replace(step=np.int32(STEP)))
    ckpt.close()

    record = {
        "flags": dataclasses.asdict(train_cfg), "model_source": str(source.resolve()),
        "source_hash": convert.source_hash(source), "vocab": stats.as_dict(), "padded_vocab": ROWS,
    }
    (workdir / "config.json").write_text(json.dumps(record))
    return workdir


CASES = {  # (source tied, run tied)
    "untied_source_tied_run": (False, True),  # TinyLlama's case: the source head is dropped
    "untied_source_untied_run": (False, False),
    "tied_source_untied_run": (True, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_loads_in_transformers_with_wake2vec_logits(tmp_path, case):
    source_tied, run_tied = CASES[case]
    workdir = make_workdir(tmp_path, source_tied=source_tied, run_tied=run_tied)
    total = len(BASE_WORDS) + len(LEXICON) - 1
    assert export_hf.export(workdir, tmp_path / "out") == STEP

    cfg, params, step = runs.load_params(workdir)
    assert step == STEP and cfg.vocab_size == total and cfg.tie_word_embeddings == run_tied
    assert ("lm_head" in params) == (not run_tied)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert hf.config.vocab_size == total and hf.config.tie_word_embeddings == run_tied

    # The trained rows are merged in bit for bit, padding rows dropped.
    trained, _ = checkpoint.load_trainable(workdir)
    state = hf.state_dict()
    np.testing.assert_array_equal(state["model.embed_tokens.weight"].numpy(), trained["embedding"][:total])
    expected_head = trained["embedding"][:total] if run_tied else trained["lm_head"]["kernel"][:, :total].T
    np.testing.assert_array_equal(state["lm_head.weight"].numpy(), expected_head)

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == total
    ids = tokenizer("w1 riverrun w5 vicus w3 commodius w58", add_special_tokens=False)["input_ids"]
    assert ids == [2, 60, 6, 62, 4, 61, 59]  # new words get ids 60.. in lexicon order; w3 keeps its base id
    batch = np.concatenate([ids, np.random.default_rng(2).integers(0, total, 32 - len(ids))])[None].astype(np.int32)
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(batch, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.forward(cfg, params, batch))
    assert hf_logits.shape == ours.shape == (1, 32, total)
    np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=0)

    provenance = json.loads((tmp_path / "out" / export_hf.PROVENANCE).read_text())
    assert provenance["step"] == STEP and provenance["vocab"]["total"] == total


def test_a_changed_source_is_refused_with_both_hashes(tmp_path):
    workdir = make_workdir(tmp_path, source_tied=False, run_tied=True)
    record = json.loads((workdir / "config.json").read_text())
    source = pathlib.Path(record["model_source"])
    cfg, params = convert.load_hf(str(source), as_numpy=True)
    params["norm"]["scale"] = params["norm"]["scale"] + 1
    convert.save_hf(cfg, params, source)
    new_hash = convert.source_hash(source)
    with pytest.raises(checkpoint.CheckpointError, match=rf"changed .*{record['source_hash'][:16]}.*{new_hash[:16]}"):
        runs.load_params(workdir)


def test_cli_exports_a_chosen_step_and_exits_non_zero_on_errors(tmp_path, capsys):
    workdir = make_workdir(tmp_path, source_tied=False, run_tied=False)

    def cli(*flags):
        return run_here(capsys, "export", *flags)

    done = cli(f"--workdir={workdir}", f"--out={tmp_path / 'out'}", f"--step={STEP}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()

    again = cli(f"--workdir={workdir}", f"--out={tmp_path / 'out'}")
    assert again.returncode != 0 and "is not empty" in again.stderr
    missing_step = cli(f"--workdir={workdir}", f"--out={tmp_path / 'out2'}", "--step=3")
    assert missing_step.returncode != 0 and "no committed checkpoint at step 3" in missing_step.stderr
    no_run = cli(f"--workdir={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out3'}")
    assert no_run.returncode != 0 and "config.json not found" in no_run.stderr


def _stored_dtypes(path: pathlib.Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_slice(name).get_dtype() for name in f.keys()}


def test_a_bf16_source_exports_a_bf16_body_and_the_table_as_trained(tmp_path):
    """Issue 11 item 10 and issue 13: not 2x the model, not a rounded table, the config as it came."""
    workdir = make_workdir(tmp_path, source_tied=False, run_tied=True, bf16_source=True)
    export_hf.export(workdir, tmp_path / "out")
    dtypes = _stored_dtypes(tmp_path / "out" / "model.safetensors")
    assert dtypes.pop("model.embed_tokens.weight") == "F32"
    assert set(dtypes.values()) == {"BF16"}, dtypes

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # transformers' default dtype
    assert hf.config.eos_token_id == [2, 5] and hf.config.pad_token_id == 0
    trained, _ = checkpoint.load_trainable(workdir)
    total = hf.config.vocab_size
    state = hf.state_dict()
    np.testing.assert_array_equal(state["model.embed_tokens.weight"].numpy(), trained["embedding"][:total])
    _, source = convert.load_hf(json.loads((workdir / "config.json").read_text())["model_source"],
                                dtype=ml_dtypes.bfloat16, as_numpy=True)
    q_proj = source["layers"]["self_attn"]["q_proj"]["kernel"][0].T.astype(np.float32)
    np.testing.assert_array_equal(state["model.layers.0.self_attn.q_proj.weight"].float().numpy(), q_proj)

    export_hf.export(workdir, tmp_path / "fp32", body_dtype="float32")
    assert set(_stored_dtypes(tmp_path / "fp32" / "model.safetensors").values()) == {"F32"}
    fp32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, fp32[name]), name  # bf16 -> fp32 is exact
