"""HF <-> wake2vec conversion: bit-exact round trips and errors that name file and field."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_oracle import hf_llama, save_checkpoint, torch, transformers
from wake2vec.models import convert, safetensors_codec
from wake2vec.config import UnsupportedConfigError


def _reloaded_state(directory):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return reloaded.state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tmp_path, fmt, tied):
    hf = hf_llama(tie_word_embeddings=tied, num_key_value_heads=4)
    cfg, params = convert.load_hf(str(save_checkpoint(hf, tmp_path / "src", fmt=fmt)))
    convert.save_hf(cfg, params, tmp_path / "out")
    original, reloaded = hf.state_dict(), _reloaded_state(tmp_path / "out")
    assert set(original) == set(reloaded)
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name


def test_sharded_safetensors_with_index(tmp_path):
    hf = hf_llama(num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    cfg, params = convert.load_hf(str(tmp_path / "src"))
    convert.save_hf(cfg, params, tmp_path / "out")
    reloaded = _reloaded_state(tmp_path / "out")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(tensor, reloaded[name]), name


def test_bf16_checkpoint_round_trip(tmp_path):
    hf = hf_llama().to(torch.bfloat16)
    cfg, params = convert.load_hf(str(save_checkpoint(hf, tmp_path / "src")), dtype=jnp.bfloat16)
    convert.save_hf(cfg, params, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    for name, tensor in hf.state_dict().items():
        # bf16 -> fp32 (table) -> bf16 is exact: fp32 holds every bf16 value.
        assert torch.equal(tensor, reloaded[name]), name


def test_save_hf_drops_vocab_padding(tmp_path):
    hf = hf_llama(vocab_size=300)
    cfg, params = convert.load_hf(str(save_checkpoint(hf, tmp_path / "src")))
    padded = dict(params, embedding=jnp.pad(params["embedding"], ((0, 84), (0, 0))))
    convert.save_hf(cfg, padded, tmp_path / "out")
    assert torch.equal(_reloaded_state(tmp_path / "out")["model.embed_tokens.weight"], hf.state_dict()["model.embed_tokens.weight"])


def test_source_hash_tracks_weight_content(tmp_path):
    hf = hf_llama()
    directory = save_checkpoint(hf, tmp_path)
    before = convert.source_hash(directory)
    assert before == convert.source_hash(directory)
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert convert.source_hash(directory) != before


# ---------------------------------------------------------------------------- errors


def test_missing_config_names_the_directory(tmp_path):
    save_checkpoint(hf_llama(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(convert.CheckpointFormatError, match=r"config\.json is missing") as err:
        convert.load_hf(str(tmp_path))
    assert str(tmp_path) in str(err.value)


def test_missing_weights_names_the_expected_files(tmp_path):
    save_checkpoint(hf_llama(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(convert.CheckpointFormatError, match="no weight file found .*model.safetensors"):
        convert.load_hf(str(tmp_path))


def test_nonexistent_path_is_refused(tmp_path):
    with pytest.raises(convert.CheckpointFormatError, match="no such checkpoint directory"):
        convert.load_hf(str(tmp_path / "nowhere"))


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model_type": "falcon"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 8.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        # Other families' configs (the Llama weights are never reached: the config is refused first).
        ({"model_type": "mistral", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
        ({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"model_type": "phi3", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"model_type": "gemma2", "hidden_act": "silu", "hidden_activation": "silu"}, "hidden_act"),
        ({"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh", "layer_types": ["chunked_attention"] * 2,
          "sliding_window": 8}, "layer_types"),
    ],
)
def test_unsupported_features_are_refused_by_field(tmp_path, changes, field):
    save_checkpoint(hf_llama(), tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(UnsupportedConfigError) as err:
        convert.load_hf(str(tmp_path))
    assert field in str(err.value) and "config.json" in str(err.value)


def test_shape_disagreeing_with_config_names_file_and_tensor(tmp_path):
    save_checkpoint(hf_llama(intermediate_size=96), tmp_path)
    _edit_config(tmp_path, intermediate_size=128)
    with pytest.raises(convert.CheckpointFormatError) as err:
        convert.load_hf(str(tmp_path))
    message = str(err.value)
    assert "model.safetensors" in message and "mlp." in message and "128" in message


def test_truncated_weight_file_is_reported(tmp_path):
    save_checkpoint(hf_llama(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(convert.CheckpointFormatError, match="truncated"):
        convert.load_hf(str(tmp_path))


def test_safetensors_codec_agrees_with_the_reference_reader(tmp_path):
    import ml_dtypes
    from safetensors.torch import load_file

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.linspace(-2, 2, 7).astype(ml_dtypes.bfloat16),
        "c": np.ones((2, 2), np.float16),
    }
    convert.write_safetensors(tmp_path / "t.safetensors", tensors)
    reference = load_file(tmp_path / "t.safetensors")
    ours = dict(safetensors_codec.iter_tensors(tmp_path / "t.safetensors"))
    for name, arr in tensors.items():
        np.testing.assert_array_equal(ours[name], arr)
        np.testing.assert_array_equal(reference[name].float().numpy(), arr.astype(np.float32))
