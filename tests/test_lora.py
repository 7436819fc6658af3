"""LoRA (wake2vec.models.lora and the model's "lora" collection) against PEFT on transformers' Llama.

The reference is PEFT's LoRA on tiny random LlamaForCausalLM models (tests.hf_oracle), its
lora_B given random values (PEFT starts it at 0, which would make every comparison of
the update trivial) and copied into wake2vec's tree. Tolerances: both sides are float32
and differ only in summation order (XLA vs torch matmuls, fused vs unfused softmax, a
chunked vs a whole-vocabulary cross-entropy); that moves a loss of ~6 by ~1e-7 and a
gradient by ~1e-7 of its largest entry. The bounds (1e-5 on the loss, 1e-5 of the largest
entry for gradients and stepped adapters, 1e-4 on logits of magnitude ~1, as
test_model_parity) leave headroom, while a wrong scale, a transposed adapter or a missed
projection moves them by 1e-2 or more.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.hf_oracle import hf_llama, hf_logits, save_checkpoint, torch, transformers
from wake2vec.models import convert, lora, model, safetensors_codec
from wake2vec.training import train
from wake2vec.config import FlagError, ModelConfig
from wake2vec.training.workdir import OutputDirError

peft = pytest.importorskip("peft")

SIX = lora.LoraSpec(dropout=0.0)  # the study's six targets, r=8, alpha=16
SUBSET = lora.LoraSpec(targets=("q_proj", "o_proj", "down_proj"), rank=4, alpha=12.0, dropout=0.0)
SEQ = 48
TINY = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _peft_modules(peft_model, name):
    block = lora._BLOCK[name]
    return [getattr(getattr(layer, block), name) for layer in peft_model.base_model.model.model.layers]


def _adapters_of(peft_model, spec, grads=False) -> dict:
    """PEFT's lora_A / lora_B weights (or their gradients) as wake2vec's tree: transposed, stacked on layers."""
    tree: dict = {"layers": {}}
    for name in spec.targets:
        modules = _peft_modules(peft_model, name)
        pick = lambda w: (w.grad if grads else w).detach().numpy().T  # noqa: E731
        a = np.stack([pick(m.lora_A["default"].weight) for m in modules])
        b = np.stack([pick(m.lora_B["default"].weight) for m in modules])
        tree["layers"].setdefault(lora._BLOCK[name], {})[name] = {"a": a, "b": b}
    return tree


def _peft_pair(tmp_path, spec, seed=0):
    """(PEFT model with random lora_B, wake2vec cfg, base params, the same adapters, base checkpoint dir)."""
    hf = hf_llama(seed=seed)
    base_dir = save_checkpoint(hf, tmp_path / "base")
    cfg, params = convert.load_hf(str(base_dir))
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=list(spec.targets), task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return peft_model, cfg, params, _adapters_of(peft_model, spec), base_dir


def _ids(vocab, batch=2, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, SEQ))


def _lora_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on the adapters, nothing on any other leaf (what the Phase 2 optimiser must do)."""
    labels = lambda params: {k: jax.tree_util.tree_map(lambda _: k == "lora", v) for k, v in params.items()}  # noqa: E731
    return optax.multi_transform({True: inner, False: optax.set_to_zero()}, labels)


def _max_scaled_diff(ours: dict, ref: dict) -> float:
    """max |ours - ref| / max |ref| over every leaf (each leaf scaled by its own reference)."""
    diffs = jax.tree_util.tree_map(lambda o, r: float(np.abs(np.asarray(o) - r).max() / np.abs(r).max()), ours, ref)
    return max(jax.tree_util.tree_leaves(diffs))


# --------------------------------------------------------------------------- parity with PEFT


@pytest.mark.parametrize("spec,optimizer", [(SIX, "sgd"), (SUBSET, "adamw")], ids=["six_r8_sgd", "subset_r4_adamw"])
def test_loss_gradients_step_and_logits_match_peft(tmp_path, spec, optimizer):
    peft_model, cfg, params, adapters, _ = _peft_pair(tmp_path, spec)
    ids = _ids(cfg.vocab_size)
    ref = peft_model(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(ids))
    ref.loss.backward()
    ref_grads = _adapters_of(peft_model, spec, grads=True)

    settings = train.StepSettings(cfg, loss_chunk=32, lora=spec)  # remat "full" and a chunked loss, as trained
    trainable = {"lora": adapters}

    def mean_loss(trainable):
        total, count = train.loss_sum_and_count(trainable, params, jnp.asarray(ids), jnp.ones(2), settings)
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(trainable)
    assert abs(float(loss) - ref.loss.item()) <= 1e-5
    assert _max_scaled_diff(grads["lora"], ref_grads) <= 1e-5

    # One update on both sides. AdamW with torch's defaults (b 0.9/0.999, eps 1e-8,
    # decoupled decay lr x wd); lr 1e-4 keeps the first step's g / (|g| + eps), which
    # amplifies the gradient's rounding where |g| is near eps, below the bound.
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    if optimizer == "sgd":
        lr, torch_opt, inner = 0.5, torch.optim.SGD(lora_params, lr=0.5), optax.sgd(0.5)
    else:
        lr = 1e-4
        torch_opt = torch.optim.AdamW(lora_params, lr=lr, weight_decay=0.01)
        inner = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    torch_opt.step()
    tx = _lora_only(inner)
    step = jax.jit(train.make_train_step(tx, optax.constant_schedule(lr), settings))
    state, metrics = step(train.init_state(trainable, params, tx), params, jnp.asarray(ids)[None])
    assert bool(metrics["finite"]) and abs(float(metrics["loss"]) - ref.loss.item()) <= 1e-5
    stepped = state.trainable["lora"]
    assert _max_scaled_diff(stepped, _adapters_of(peft_model, spec)) <= 1e-5

    # Our unmerged adapters against PEFT's merged model, both after the step.
    ours = np.asarray(model.forward(cfg, {**params, "lora": stepped}, jnp.asarray(ids), lora=spec))
    assert np.abs(ours - hf_logits(peft_model.merge_and_unload(), ids)).max() <= 1e-4


def test_init_is_peft_default_and_starts_at_the_base_model(tmp_path):
    hf = hf_llama()
    cfg, params = convert.load_hf(str(save_checkpoint(hf, tmp_path)))
    fresh = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(SIX.targets)))
    ref = _adapters_of(fresh, SIX)
    ours = lora.init_adapters(cfg, SIX, jax.random.key(0))
    assert jax.tree_util.tree_map(np.shape, ours) == jax.tree_util.tree_map(np.shape, ref)
    for name in SIX.targets:
        block, fan_in = lora._BLOCK[name], ref["layers"][lora._BLOCK[name]][name]["a"].shape[1]
        ours_a, ref_a = np.asarray(ours["layers"][block][name]["a"]), ref["layers"][block][name]["a"]
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) on (r, in): uniform(+-1/sqrt(in))
        assert np.abs(ours_a).max() <= bound and np.abs(ref_a).max() <= bound
        # 2 * 8 * fan_in >= 1024 draws: the largest is within 1% of the bound and the
        # standard deviation (bound / sqrt(3)) within 10%, each failing by chance < 1e-4.
        assert np.abs(ours_a).max() > 0.99 * bound and abs(ours_a.std() * np.sqrt(3) / bound - 1) < 0.1
        assert not np.any(ours["layers"][block][name]["b"]) and not np.any(ref["layers"][block][name]["b"])
    ids = jnp.asarray(_ids(cfg.vocab_size, batch=1))
    # b = 0 adds exact zeros: the adapted model is the base model, bit for bit.
    np.testing.assert_array_equal(model.forward(cfg, {**params, "lora": ours}, ids, lora=SIX), model.forward(cfg, params, ids))
    q_only = lora.init_adapters(cfg, lora.LoraSpec(targets=("q_proj",)), jax.random.key(0))
    np.testing.assert_array_equal(q_only["layers"]["self_attn"]["q_proj"]["a"], ours["layers"]["self_attn"]["q_proj"]["a"])


# --------------------------------------------------------------------------- dropout


@functools.cache
def _tiny(spec):
    """A random TINY model with random adapters (b non-zero) and its ids; cached, as the tests only read them."""
    params = jax.jit(model.init_params, static_argnums=0)(TINY, jax.random.key(0))
    adapters = lora.init_adapters(TINY, spec, jax.random.key(1))
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(jax.random.key(2), x.shape) if path[-1].key == "b" else x, adapters)
    return params, adapters, jnp.asarray(_ids(TINY.vocab_size, batch=2))


def test_dropout_follows_the_key_and_eval_is_dropout_free():
    spec = lora.LoraSpec(dropout=0.5)
    params, adapters, ids = _tiny(spec)
    full = {**params, "lora": adapters}
    hidden = jax.jit(lambda key, s=spec: model.hidden_states(TINY, full, ids, lora=s, dropout_key=key).hidden,
                     static_argnums=1)
    np.testing.assert_array_equal(hidden(jax.random.key(1)), hidden(jax.random.key(1)))
    assert np.abs(np.asarray(hidden(jax.random.key(1)) - hidden(jax.random.key(2)))).max() > 1e-3
    # Without a key no mask is drawn: exactly the dropout-0 model.
    np.testing.assert_array_equal(hidden(None), hidden(None, lora.LoraSpec(dropout=0.0)))
    # The cache path (generation) is the same model; attending over the cache's padded
    # length sums in another order, ~1e-6 on these logits.
    cached, _ = jax.jit(lambda: model.forward_with_cache(TINY, full, ids, model.init_cache(TINY, 2, SEQ), 0, lora=spec))()
    np.testing.assert_allclose(cached, jax.jit(lambda: model.forward(TINY, full, ids, lora=spec))(), atol=1e-5)


def test_kept_fraction_and_inverted_scaling():
    rate, width, rows = 0.3, 256, 512
    spec = lora.LoraSpec(targets=("q_proj",), rank=width, alpha=float(width), dropout=rate)  # scale 1
    linear = model.Linear(width, jnp.float32, lora=spec, name="q_proj")
    variables = {"params": {"kernel": jnp.zeros((width, width))}, "lora": {"a": jnp.eye(width), "b": jnp.eye(width)}}
    out = np.asarray(linear.apply(variables, jnp.ones((rows, width)), rngs={"dropout": jax.random.key(0)}))
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-6)  # kept values scaled as torch does
    # Bernoulli(1 - rate) over n = 131,072 entries: std sqrt(rate (1 - rate) / n) = 0.0013;
    # 6 standard deviations fail by chance with probability 2e-9.
    assert abs(kept.mean() - (1 - rate)) <= 6 * np.sqrt(rate * (1 - rate) / kept.size)


def test_each_step_and_microbatch_draws_its_own_masks_and_a_rerun_the_same():
    spec = lora.LoraSpec(dropout=0.5)
    params, adapters, ids = _tiny(spec)
    settings = train.StepSettings(TINY, remat="none", lora=spec, seed=3)
    tx = _lora_only(optax.sgd(0.1))
    step = jax.jit(train.make_train_step(tx, optax.constant_schedule(0.1), settings))
    state = train.init_state({"lora": adapters}, params, tx)
    batch = jnp.stack([ids, ids])  # two identical microbatches

    @jax.jit
    def micro_loss(index):
        key = train.dropout_key(settings.seed, 0, index)
        total, count = train.loss_sum_and_count({"lora": adapters}, params, ids, jnp.ones(2), settings, key)
        return total / count

    new, metrics = step(state, params, batch)
    first, second = float(micro_loss(0)), float(micro_loss(1))
    assert abs(first - second) > 1e-4
    assert abs(float(metrics["loss"]) - (first + second) / 2) <= 1e-5  # fp32 rounding of the same masks
    again, _ = step(state, params, batch)  # a resumed run recomputes this step exactly
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, new)
    _, later = step(state.replace(step=jnp.asarray(5, jnp.int32)), params, batch)
    assert abs(float(later["loss"]) - float(metrics["loss"])) > 1e-4


def test_remat_keeps_dropout_and_gradients():
    spec = lora.LoraSpec(dropout=0.3)
    params, adapters, ids = _tiny(spec)

    def loss(adapters, remat, key=jax.random.key(7)):
        hidden = model.hidden_states(TINY, {**params, "lora": adapters}, ids, remat=remat, lora=spec, dropout_key=key).hidden
        return jnp.sum(hidden**2)

    loss = jax.jit(loss, static_argnums=1)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    plain = grad(adapters, "none")
    # Another key's masks move the gradient by far more than the bound below.
    assert _max_scaled_diff(grad(adapters, "none", jax.random.key(8)), plain) > 1e-2
    # The recomputed forward draws the same masks (same forward, bit for bit); XLA fuses the
    # rematerialised backward differently, which moves gradients by ~5e-5 of their largest
    # entry (2e-5 with dropout 0): a mask drawn anew would move them by > 1e-2. Which
    # policy ("full", "dots") only changes what is saved, not how the rngs are threaded.
    assert np.array_equal(loss(adapters, "full"), loss(adapters, "none"))
    assert _max_scaled_diff(grad(adapters, "full"), plain) <= 2e-4


# --------------------------------------------------------------------------- export, load, merge


def test_export_matches_peft_files_and_peft_loads_it(tmp_path):
    spec = lora.LoraSpec()  # the study's, dropout 0.1 (inactive in eval mode on both sides)
    peft_model, cfg, params, adapters, base_dir = _peft_pair(tmp_path, spec)
    peft_model.save_pretrained(tmp_path / "peft")
    out = lora.export_peft(tmp_path / "ours", adapters, spec, cfg, str(base_dir))

    ref_tensors = dict(safetensors_codec.iter_tensors(tmp_path / "peft" / lora.ADAPTER_WEIGHTS))
    our_tensors = dict(safetensors_codec.iter_tensors(out / lora.ADAPTER_WEIGHTS))
    assert {k: (v.shape, v.dtype) for k, v in our_tensors.items()} == {k: (v.shape, v.dtype) for k, v in ref_tensors.items()}
    assert all(np.array_equal(our_tensors[k], ref_tensors[k]) for k in ref_tensors)
    ours_config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    ref_config = json.loads((tmp_path / "peft" / lora.ADAPTER_CONFIG).read_text())
    assert ours_config["base_model_name_or_path"] == str(base_dir)
    for key, value in ours_config.items():
        if key == "target_modules":
            assert set(value) == set(ref_config[key])
        elif key != "base_model_name_or_path":
            assert value == ref_config[key], key

    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    ids = _ids(cfg.vocab_size)
    ours = np.asarray(model.forward(cfg, {**params, "lora": adapters}, jnp.asarray(ids), lora=spec))
    assert np.abs(ours - hf_logits(loaded, ids)).max() <= 1e-4

    for directory in (out, tmp_path / "peft"):  # ours, and a user's PEFT adapter
        back, back_spec = lora.load_peft(directory)
        assert back_spec == spec
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, adapters)


def test_merged_export_loads_in_transformers(tmp_path):
    _, cfg, params, adapters, _ = _peft_pair(tmp_path, SUBSET)
    merged = lora.merge(params, adapters, SUBSET)
    convert.save_hf(cfg, merged, tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = _ids(cfg.vocab_size)
    ours = np.asarray(model.forward(cfg, {**params, "lora": adapters}, jnp.asarray(ids), lora=SUBSET))
    assert np.abs(ours - hf_logits(hf, ids)).max() <= 1e-4
    untouched = params["layers"]["self_attn"]["k_proj"]["kernel"]
    assert merged["layers"]["self_attn"]["k_proj"]["kernel"] is untouched  # not a target: the same array

    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert lora.merge(bf16, adapters, SUBSET)["layers"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    quantized = jax.tree_util.tree_map(lambda x: x.astype(jnp.int8), params)
    with pytest.raises(ValueError, match="not a float dtype"):
        lora.merge(quantized, adapters, SUBSET)


def test_adapter_norms_are_the_updates_frobenius_norms():
    params, adapters, _ = _tiny(SUBSET)
    norms = lora.adapter_norms(adapters, SUBSET)
    assert set(norms) == set(SUBSET.targets)
    for block, name, a, b in lora._projections(adapters, SUBSET):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        update = [np.linalg.norm(SUBSET.scale * a[i] @ b[i]) for i in range(TINY.num_hidden_layers)]
        np.testing.assert_allclose(norms[name]["update"], update, rtol=1e-9)  # both float64: the trace identity is exact to rounding
        np.testing.assert_allclose(norms[name]["a"], np.linalg.norm(a, axis=(1, 2)), rtol=1e-12)
        assert all(isinstance(x, float) for x in norms[name]["update"] + norms[name]["b"])
    json.dumps(norms)


def test_user_errors(tmp_path):
    assert lora.parse_targets(" v_proj,q_proj ,") == ("q_proj", "v_proj")
    with pytest.raises(FlagError, match="--lora_targets.*qproj.*o_proj"):
        lora.parse_targets("q_proj,qproj")
    params, adapters, _ = _tiny(SIX)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(OutputDirError, match="not empty"):
        lora.export_peft(tmp_path / "full", adapters, SIX, TINY, "base")
    out = lora.export_peft(tmp_path / "dora", adapters, SIX, TINY, "base")
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    (out / lora.ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(lora.PeftFormatError, match="use_dora"):
        lora.load_peft(out)
    with pytest.raises(lora.PeftFormatError, match="do not fit"):
        lora.export_peft(tmp_path / "wrong", adapters, SUBSET, TINY, "base")
