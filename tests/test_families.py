"""Every base family the study ran, held to transformers' own torch class.

For each family in tests.hf_oracle.FAMILIES (Llama 3 with llama3 RoPE and tied head, Llama
with linear RoPE, Mistral with a sliding window, Qwen2 with q/k/v biases, Phi-3 with fused
projections and longrope, Gemma 2 with soft-caps, alternating local/global layers and
query_pre_attn_scalar), one random checkpoint is converted once and checked for: logits
and every layer's hidden states on a 600-token input, the distinctive feature being active
there, a bit-exact round trip through save_hf, greedy decoding, and the table gradient of
the Phase 1 loss against torch autograd.

Tolerances: 1e-4 on logits and hidden states, as tests/test_model_parity.py argues (float32
on both sides, different summation orders, ~1e-6 measured; a real bug shows at >1e-2). The
gradient is compared relative to its largest entry at 1e-5: float32 sums over 600 tokens
differ by ~1e-7 relative, and a wrong chain rule (a missed soft-cap derivative, a missed
embedding scale) is off by O(1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_oracle import FAMILIES, hf_family, hf_greedy, hf_logits, torch, transformers
from wake2vec.models import convert, generate, model
from wake2vec.training import train
from wake2vec.config import ModelConfig, UnsupportedConfigError

pytestmark = pytest.mark.accelerator  # re-run on a device by benchmarks.accelerator

SEQ = 600
TIE_MARGIN = 1e-5  # as tests/test_generate.py: far above the ~1e-7 logit difference


@dataclasses.dataclass
class Converted:
    hf: object
    cfg: object
    params: dict
    directory: object


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> Converted:
    hf = hf_family(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    cfg, params = convert.load_hf(str(directory))
    return Converted(hf, cfg, params, directory)


def _ids(cfg, length, seed=0, batch=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, length))


def _hf_without_feature(hf) -> dict:
    """transformers models equal to `hf` but for one distinctive feature, switched off."""
    config, variants = hf.config, {}
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        variants["rope_scaling"] = {"rope_parameters": {"rope_type": "default", "rope_theta": rope["rope_theta"]}}
    if getattr(config, "sliding_window", None):
        layers = config.num_hidden_layers
        # Gemma 2 keeps its window and marks layers local; the others apply the window everywhere.
        variants["sliding_window"] = (
            {"layer_types": ["full_attention"] * layers} if config.model_type == "gemma2" else {"sliding_window": None}
        )
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, cap, None) is not None:
            variants[cap] = {cap: None}
    if getattr(config, "query_pre_attn_scalar", None) not in (None, getattr(config, "head_dim", None)):
        variants["query_pre_attn_scalar"] = {"query_pre_attn_scalar": config.head_dim}
    state = hf.state_dict()
    models = {}
    for feature, changes in variants.items():
        changed = type(config).from_dict({**config.to_dict(), **changes})
        changed._attn_implementation = config._attn_implementation
        models[feature] = type(hf)(changed).eval()
        models[feature].load_state_dict(state)
    if any(name.endswith(".bias") for name in state):
        models["qkv_bias"] = type(hf)(config).eval()
        models["qkv_bias"].load_state_dict({k: v * 0 if k.endswith(".bias") else v for k, v in state.items()})
    return models


def test_forward_and_table_gradient_match_transformers(family):
    """Logits, every layer's output, and the Phase 1 loss and its table gradient (frozen body)."""
    cfg, params, hf = family.cfg, family.params, family.hf
    ids = _ids(cfg, SEQ)
    trainable = {k: params[k] for k in ("embedding", "lm_head") if k in params}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    settings = train.StepSettings(cfg, remat="none", loss_chunk=256)

    def mean_loss(t):
        total, count = train.loss_sum_and_count(t, frozen, jnp.asarray(ids), jnp.ones(1), settings)
        return total / count

    def ours(t):
        full = {**frozen, **t}
        out = model.hidden_states(cfg, full, jnp.asarray(ids))
        return jax.value_and_grad(mean_loss)(t), out.per_layer, model.logits_from_hidden(cfg, full, out.hidden)

    # One compile for the forward pass and the gradient.
    (loss, grads), per_layer, logits = jax.jit(ours)(trainable)

    captured = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for layer in hf.model.layers]
    for name, param in hf.named_parameters():
        param.requires_grad_(name in ("model.embed_tokens.weight", "lm_head.weight"))
    hf.zero_grad()
    ids_t = torch.as_tensor(ids)
    out = hf(ids_t, labels=ids_t)
    out.loss.backward()
    for h in hooks:
        h.remove()

    ref = out.logits.detach().numpy()
    assert logits.shape == ref.shape == (1, SEQ, cfg.vocab_size)
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4
    assert len(captured) == cfg.num_hidden_layers
    for layer, hidden in enumerate(captured):
        assert np.abs(np.asarray(per_layer[layer]) - hidden.detach().numpy()).max() <= 1e-4, layer
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    expected = {"embedding": hf.model.embed_tokens.weight.grad.numpy()}
    got = {"embedding": np.asarray(grads["embedding"])}
    if not cfg.tie_word_embeddings:
        expected["lm_head"] = hf.lm_head.weight.grad.numpy().T
        got["lm_head"] = np.asarray(grads["lm_head"]["kernel"])
    for name, grad in expected.items():
        scale = np.abs(grad).max()
        assert scale > 0 and np.abs(got[name] - grad).max() <= 1e-5 * scale, name

    # The input exercises the family's feature: in transformers itself, switching it off
    # moves the logits by more than 10x the tolerance.
    variants = _hf_without_feature(hf)
    assert variants, "every family case must have a distinctive feature to test"
    for feature, plain in variants.items():
        assert np.abs(hf_logits(plain, ids) - ref).max() > 10 * 1e-4, f"{feature} hardly moves the logits"


def test_round_trip_through_save_hf_is_bit_exact(family, tmp_path):
    convert.save_hf(family.cfg, family.params, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(reloaded) is type(family.hf)
    original, state = family.hf.state_dict(), reloaded.state_dict()
    assert set(original) == set(state)
    for name, tensor in original.items():
        assert torch.equal(tensor, state[name]), name
    for field in ("eos_token_id", "sliding_window", "layer_types", "tie_word_embeddings", "rope_parameters",
                  "final_logit_softcapping", "attn_logit_softcapping", "query_pre_attn_scalar"):
        assert getattr(reloaded.config, field, None) == getattr(family.hf.config, field, None), field
    # head_dim is written out even where the source left it implicit: the same head size.
    assert convert.read_config(tmp_path).replace(head_dim=None) == family.cfg.replace(head_dim=None)


def test_greedy_generation_matches_transformers(family):
    cfg, params = family.cfg, family.params
    ids = _ids(cfg, 7, seed=3, batch=2)
    expected, margin = hf_greedy(family.hf, ids, 24)
    assert margin > TIE_MARGIN, "random model too close to a tie for an exact comparison; change its seed"
    ours = np.asarray(generate.generate(cfg, params, ids, 24))
    np.testing.assert_array_equal(ours, expected)


def test_longrope_decoding_across_the_switch_is_refused():
    cfg = ModelConfig.from_hf_dict(hf_family("phi3").config.to_dict())
    with pytest.raises(UnsupportedConfigError, match="longrope"):  # refused before any weight is read
        generate.generate(cfg, None, [[1] * 250], 10)


def test_a_listed_eos_id_stops_decoding_as_in_transformers(tmp_path):
    """Llama 3's list-valued eos_token_id: a row stops at whichever listed id comes first."""
    hf = hf_family("llama3_tied")
    hf.save_pretrained(tmp_path)
    cfg, params = convert.load_hf(str(tmp_path))
    assert cfg.eos_ids == (2, 5, 7)
    prompt = _ids(cfg, 7, seed=3)
    free, _ = hf_greedy(hf, prompt, 24)
    stop = int(free[0, 7 + 5])  # make the 6th new token an end of sequence
    unused = next(i for i in range(cfg.vocab_size) if i not in free[0])
    eos = (unused, stop)
    expected = hf.generate(torch.as_tensor(prompt), do_sample=False, max_new_tokens=24, eos_token_id=list(eos),
                           pad_token_id=unused).numpy()
    ours = np.asarray(generate.generate(cfg, params, prompt, 24, eos_id=eos))
    first = 7 + int(np.flatnonzero(np.isin(free[0, 7:], eos))[0])
    assert expected.shape == (1, first + 1)  # transformers stops the batch there
    np.testing.assert_array_equal(ours[:, : first + 1], expected)
    assert np.all(ours[:, first + 1:] == unused)  # then the row holds the first listed id


def test_phi3_su_rope_is_read_as_longrope():
    config = hf_family("phi3").config.to_dict()
    rope = config.pop("rope_parameters")
    old = ModelConfig.from_hf_dict({**config, "rope_scaling": {
        "type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}})
    assert old == ModelConfig.from_hf_dict({**config, "rope_parameters": rope})
    assert old.rope_scaling.rope_type == "longrope"
