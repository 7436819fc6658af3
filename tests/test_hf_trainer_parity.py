"""Phase 1 end to end against the HF Trainer recipe in torch (issue 11, items 1-4).

`loop.run` trains a real (non-demo) workdir: a tiny tied Llama source on disk, a word-level
tokenizer grown by 45 coinages to 195 tokens (padded to 256 rows, so padding is in play), a
corpus whose training split is 8 blocks and a step that takes all 8 (2 x 4 accumulated):
every step sees the whole split, so the order of the blocks cannot matter. The oracle is the
same recipe built from HF's own pieces: `Trainer.get_optimizer_cls_and_kwargs` for the
optimiser (transformers' torch Adafactor as HF Trainer configures it), `TrainingArguments.get_warmup_steps`
and `get_scheduler` for the schedule, `torch.nn.utils.clip_grad_norm_` for the clip, the
model's own loss, and, for `--mask_base_rows`, the study's gradient hook on the table.

The clip norm is set below the first step's gradient norm and the warmup is fractional
(12 steps x 0.1 = 1.2: HF warms up over 2 steps), and the test checks that both clips
really fire (the update-RMS clip with the mask off, see CASES). Tolerances: losses within 1e-5 (float32 sums of 120 token losses ~5 in two
summation orders; measured below 1e-6), the final table within 1e-5 x its movement.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.hf_oracle import hf_llama, save_checkpoint, torch, transformers
from wake2vec.phases import runs
from wake2vec.models import generate
from wake2vec.training import loop
from wake2vec.config import TrainConfig

BASE = ["[UNK]"] + [f"w{i}" for i in range(149)]  # 150 base tokens
NEW = [f"wake{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(45)]  # 45 coinages -> 195 tokens
SEQ_LEN, TRAIN_BLOCKS, STEPS, WARMUP_RATIO, LR = 16, 8, 12, 0.1, 3e-2


def _sources(root: pathlib.Path) -> dict[str, str]:
    source = root / "source"
    save_checkpoint(hf_llama(vocab_size=len(BASE), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             max_position_embeddings=512), source)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(BASE)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(source)
    rng = np.random.default_rng(0)
    words = rng.choice(BASE[1:] + NEW * 2, 10 * SEQ_LEN + 5)  # 10 blocks: 8 train, 2 validation
    (root / "corpus.txt").write_text(" ".join(words) + "\n")
    (root / "lexicon.txt").write_text("\n".join(NEW) + "\n")
    return {"model": str(source), "corpus": str(root / "corpus.txt"), "lexicon": str(root / "lexicon.txt")}


def _hf_recipe(cfg: TrainConfig, workdir: pathlib.Path, base_size: int):
    """(per-step losses, per-step pre-clip grad norms, per-step update RMS / lr, final table)."""
    args = transformers.TrainingArguments(
        output_dir=str(workdir / "hf"), optim="adafactor",
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.clip_norm,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.schedule, report_to=[])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "tokenizer")
    ids = tokenizer(pathlib.Path(cfg.corpus).read_text(), add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(np.asarray(ids[: TRAIN_BLOCKS * SEQ_LEN]).reshape(TRAIN_BLOCKS, SEQ_LEN))

    hf = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    pre = np.load(workdir / "embeddings_pre.npy")
    hf.resize_token_embeddings(len(pre), mean_resizing=False)
    table = hf.get_input_embeddings().weight
    with torch.no_grad():
        table.copy_(torch.from_numpy(pre))
    assert hf.get_output_embeddings().weight is table  # tied, as the run
    for p in hf.parameters():
        p.requires_grad_(False)
    table.requires_grad_(True)
    if cfg.mask_base_rows:  # the study's hook
        keep = (torch.arange(len(pre)) >= base_size).float()[:, None]
        table.register_hook(lambda grad: grad * keep)

    optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = optimizer_cls([{"params": [table], "weight_decay": args.weight_decay}], **kwargs)
    scheduler = transformers.get_scheduler(args.lr_scheduler_type, optimizer,
                                           num_warmup_steps=args.get_warmup_steps(STEPS), num_training_steps=STEPS)
    losses, norms, update_rms = [], [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_([table], args.max_grad_norm)))
        lr = scheduler.get_last_lr()[0]
        before = table.detach().clone()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        update_rms.append(float((table.detach() - before).pow(2).mean().sqrt()) / lr if lr > 0 else 0.0)
    return np.asarray(losses), np.asarray(norms), np.asarray(update_rms), table.detach().numpy()


# The study's optimiser, mask off (the reference run) and on. AdamW is pinned step by step on
# fixed gradients in test_train_step instead: over a whole run its per-entry normalisation
# amplifies the float32 noise of near-zero gradient entries (measured here: 4e-5 of the
# movement at lr 3e-2 and at 3e-3 alike, losses within 1.1e-5), beyond this test's 1e-5.
CASES = {
    "adafactor": dict(generate_at_end=True),  # item 8 rides along: a real model gets the study's prompt
    "adafactor_masked": dict(mask_base_rows=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_phase1_run_matches_the_hf_trainer_recipe(tmp_path, case):
    sources = _sources(tmp_path)
    # A clip norm below the first gradient norm (about 0.9 here), so the global clip fires.
    cfg = TrainConfig(workdir=str(tmp_path / "run"), **sources, seq_len=SEQ_LEN, val_fraction=0.2,
                      batch_size=2, grad_accum=4, max_steps=STEPS, lr=LR, warmup_ratio=WARMUP_RATIO,
                      clip_norm=0.5, log_every=1, eval_every=STEPS, save_every=STEPS, analyze=False,
                      loss_chunk=32, injection="reference", **CASES[case])  # the study's add_tokens
    loop.run(cfg)
    workdir = pathlib.Path(cfg.workdir)
    record = json.loads((workdir / "config.json").read_text())
    assert record["data"]["train_blocks"] == TRAIN_BLOCKS and record["vocab"]["total"] == 195
    assert record["padded_vocab"] == 256  # padding rows are in play
    base_size = record["vocab"]["base_size"]

    losses, norms, update_rms, table = _hf_recipe(cfg, workdir, base_size)
    events = [e for e in (json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
              if "train_loss" in e]
    ours = np.asarray([e["train_loss"] for e in events])
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    # Both clips fire: the global norm exceeds the clip, and Adafactor's clipped update
    # has RMS exactly 1 (times the lr). Masked, HF's RMS runs over the whole table, the
    # base rows' zeros included, and stays below 1 at this shape; the clip under the mask
    # is pinned by test_train_step's one-step comparison with HF's Adafactor instead.
    assert (norms > cfg.clip_norm).sum() >= 2, norms
    if not cfg.mask_base_rows:
        assert (np.abs(update_rms - 1.0) < 1e-4).sum() >= 2, update_rms
        # The logged grad_norm is the pre-clip norm HF Trainer logs.
        np.testing.assert_allclose([e["grad_norm"] for e in events], norms, rtol=1e-5)

    trained, _ = runs.load_table(workdir)
    pre = np.load(workdir / "embeddings_pre.npy")
    movement = np.abs(table - pre).max()
    loss_diff, table_diff = np.abs(ours - losses).max(), np.abs(trained - table).max()
    print(f"{case}: max loss difference {loss_diff:.2e}; table difference {table_diff:.2e} = "
          f"{table_diff / movement:.2e} x its movement {movement:.3g}")
    assert loss_diff <= 1e-5, (ours, losses)
    assert table_diff <= 1e-5 * movement, (table_diff, movement)
    if cfg.mask_base_rows:
        np.testing.assert_array_equal(trained[:base_size], pre[:base_size])
    if cfg.generate_at_end:
        text = (workdir / generate.GENERATIONS_FILE).read_text()
        settings = generate.GenerationSettings()  # the study's, not the demo's
        assert settings.prompt in text and f"| max_new_tokens | {settings.max_new_tokens} |" in text
        assert text.count("## temperature") == len(settings.temperatures)
