"""Tiny random HF Llama checkpoints built locally: the test oracle (no downloads).

torch and transformers are test-only dependencies; tests that import this module skip
when torch is absent.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_llama(
    *,
    vocab_size: int = 301,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    **extra,
):
    """A randomly initialised transformers LlamaForCausalLM in eval mode (float32, CPU)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        **extra,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # HF's init leaves norms at exactly 1; perturb them so a norm that is skipped or
    # misplaced shows up in the logits.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_checkpoint(model, directory: pathlib.Path, *, fmt: str = "safetensors") -> pathlib.Path:
    """Saves as model.safetensors (transformers' own writer) or pytorch_model.bin (torch.save)."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        model.save_pretrained(directory)
    elif fmt == "bin":
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        torch.save(state, directory / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return directory


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()
