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


def hf_greedy(hf, ids, new_tokens, repetition_penalty=1.0):
    """transformers' greedy tokens and the smallest top-2 gap among the logits it chose from."""
    out = hf.generate(
        torch.as_tensor(ids), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        eos_token_id=None, pad_token_id=0, repetition_penalty=repetition_penalty,
        output_scores=True, return_dict_in_generate=True,
    )
    scores = torch.stack(out.scores, dim=1).numpy()
    top2 = np.sort(scores, axis=-1)[..., -2:]
    return out.sequences.numpy(), float((top2[..., 1] - top2[..., 0]).min())


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids))).logits.numpy()


# One small random config per family, each with its distinctive feature active on the
# ~600-token parity inputs: RoPE scaled past its original context, a sliding window far
# shorter than the input (and than a 31-token generation), q/k/v biases, fused projections
# with longrope, and Gemma 2's soft-caps set low enough that they bind.
_SMALL = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
FAMILIES = {
    "llama3_tied": ("Llama", dict(
        tie_word_embeddings=True, rope_theta=500000.0, eos_token_id=[2, 5, 7],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128})),
    "llama_linear": ("Llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": ("Mistral", dict(sliding_window=16, head_dim=16)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True, vocab_size=320)),
    "phi3": ("Phi3", dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=20, original_max_position_embeddings=256,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                      "long_factor": [2.0, 3.0, 5.0, 8.0]})),
    "gemma2": ("Gemma2", dict(
        head_dim=32, query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=1.0,
        final_logit_softcapping=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=1, attn_implementation="eager")),
}


def hf_family(name: str, seed: int = 0):
    """The family's random transformers model (its own *ForCausalLM class), eval mode, float32.

    Norm gains and biases are perturbed (HF initialises them to exactly 1 / 0, which would
    hide a skipped norm or bias), and q/k are scaled up so attention is peaked enough for RoPE
    scaling, windows and Gemma's attention soft-cap to move the logits.
    """
    prefix, overrides = FAMILIES[name]
    torch.manual_seed(seed)
    kwargs = {**_SMALL, **overrides}
    attn = kwargs.pop("attn_implementation", None)
    config = getattr(transformers, f"{prefix}Config")(**kwargs)
    if attn:
        config._attn_implementation = attn
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight") or param_name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            if param_name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(8.0)
    return model
