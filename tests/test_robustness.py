"""Bad inputs and faults as a user meets them, one table row each (issue 12).

Every row names a launcher, its flags, the exit code and the message the user must see,
and runs on a private copy of one tiny demo workdir prepared and trained once for the
module. After every row the copy's earlier results (config.json, embeddings_pre.npy,
metrics.jsonl, the loss table, the tokenizer, the checkpoints, the demo sources, the
token cache) must be byte-identical to what they were, or, for the files a row damages
on purpose and the run may repair, identical to the original. Launchers run in-process
through wake2vec.launcher.main (fast); the Ctrl-C test needs a real signal and is a
subprocess.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import pytest

from experiments import export_hf, generate as generate_cli
from tests.conftest import REPO_ROOT
from tests.launchers import LAUNCHERS, invoke
from wake2vec import launcher
from wake2vec.training import workdir as records

FAST = ("--seq_len=32", "--batch_size=2", "--grad_accum=2", "--log_every=2", "--eval_blocks=4", "--eval_every=2",
        "--save_every=2", "--analyze=false", "--generate_at_end=false")
TRAINED_STEPS = 2

# Files that are records of the invocation or caches, not results.
NOT_RESULTS = {".lock", records.HASH_CACHE}


def snapshot(workdir: pathlib.Path, *homes: pathlib.Path) -> dict[str, str]:
    """relative path -> sha256 of every result file.

    config.json is compared without its command line and with the workdir's own path (the
    copy's, or the fixture's it was copied from: `homes`) written as <W>, since the record
    names where its files are. TensorBoard's event file is rebuilt from metrics.jsonl on
    every start (wake2vec.training.tboard) under a name and wall times of that start, so it is
    compared by what it holds: every (step, tag, value).
    """
    digests = {}
    for path in sorted(workdir.rglob("*")):
        rel = path.relative_to(workdir).as_posix()
        if not path.is_file() or rel in NOT_RESULTS:
            continue
        data = path.read_bytes()
        if path.name.startswith("events.out.tfevents."):
            rel, data = f"{path.parent.relative_to(workdir).as_posix()}/events (scalars)", _event_scalars(path)
        elif rel == records.CONFIG:
            try:
                record = json.loads(data)
                record.pop("command", None)
                record["flags"].pop("workdir", None)
                text = json.dumps(record, sort_keys=True)
                for home in (workdir, *homes):
                    text = text.replace(str(home), "<W>")
                data = text.encode()
            except (ValueError, KeyError, TypeError):
                pass  # a row that garbles config.json compares its bytes
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def _event_scalars(path: pathlib.Path) -> bytes:
    """Every (step, tag, value) of a TensorBoard event file, read with TensorBoard's own loader."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    events = [event_pb2.Event.FromString(raw) for raw in RawEventFileLoader(str(path)).Load()]
    return repr([(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]).encode()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A demo workdir prepared with --max_steps=0, and a copy then trained for 2 steps."""
    root = tmp_path_factory.mktemp("runs")
    prepared, trained = root / "prepared", root / "trained"
    assert invoke("train", f"--workdir={prepared}", *FAST, "--max_steps=0") == 0
    shutil.copytree(prepared, trained)
    # Preparing is no setting: the training command is accepted on a prepared workdir.
    assert invoke("train", f"--workdir={trained}", *FAST, f"--max_steps={TRAINED_STEPS}") == 0
    return {"prepared": prepared, "trained": trained}


# ----------------------------------------------------------------------- damage to set up


def flip_byte(rel: str, offset: int = -9) -> Callable[[pathlib.Path], None]:
    def damage(w: pathlib.Path) -> None:
        data = bytearray((w / rel).read_bytes())
        data[offset] ^= 0x01
        (w / rel).write_bytes(bytes(data))
    return damage


def token_cache(w: pathlib.Path) -> pathlib.Path:
    (path,) = w.glob("corpus_tokens_*.npy")
    return path


def change_one_token_id(w: pathlib.Path) -> None:
    path = token_cache(w)
    ids = np.load(path)
    ids[100] = (ids[100] + 1) % 1000
    np.save(path, ids)


def truncate_token_cache(w: pathlib.Path) -> None:
    path = token_cache(w)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble_metrics_line(w: pathlib.Path) -> None:
    lines = (w / records.METRICS).read_text().splitlines(keepends=True)
    # A flipped digit in the middle of the line's training loss: still valid JSON.
    lines[1] = re.sub(r'(?<="train_loss": )\d', lambda m: str((int(m.group()) + 1) % 10), lines[1])
    (w / records.METRICS).write_text("".join(lines))


def tear_last_metrics_line(w: pathlib.Path) -> None:
    with open(w / records.METRICS, "a") as f:
        f.write('{"step": 4, "train_lo')


def log_past_the_checkpoint(w: pathlib.Path) -> None:
    """What a run killed before its next commit leaves: events after the last checkpoint."""
    records.append_metrics(w, {"step": TRAINED_STEPS + 1, "train_loss": 6.5, "lr": 0.001, "tokens_per_s": 1.0})
    records.append_metrics(w, {"step": TRAINED_STEPS + 1, "val_loss": 6.4})


def truncate(rel: str, keep: int = 100) -> Callable[[pathlib.Path], None]:
    def damage(w: pathlib.Path) -> None:
        (w / rel).write_bytes((w / rel).read_bytes()[:keep])
    return damage


def edit_tokenizer_json(w: pathlib.Path) -> None:
    with open(w / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")


def leftover_partial_demo_model(w: pathlib.Path) -> None:
    partial = w / "demo_sources" / "base_model.partial"
    partial.mkdir()
    (partial / "config.json").write_text("{")


def write(rel: str, content: bytes) -> Callable[[pathlib.Path], None]:
    def setup(w: pathlib.Path) -> None:
        (w.parent / rel).write_bytes(content)
    return setup


def both(*setups):
    def setup(w: pathlib.Path) -> None:
        for one in setups:
            one(w)
    return setup


# ----------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    launcher: str
    args: tuple[str, ...]  # {W}: the workdir copy, {T}: the case's directory beside it
    code: int
    message: str  # a regular expression the output must contain
    base: str = "trained"
    setup: Callable[[pathlib.Path], None] | None = None
    repaired: tuple[str, ...] = ()  # damaged by setup; the command must restore the original bytes
    hold_lock: bool = False  # another live run holds the workdir
    check: Callable[[pathlib.Path, dict, dict], None] | None = None  # (workdir, original, after)


def train(name, *args, code=1, message="", **kw) -> Case:
    """A train_p1 row with the fixture's own schedule, so only the given flags differ."""
    return Case(name, "train", ("--workdir={W}", *FAST, f"--max_steps={TRAINED_STEPS}", *args), code, message, **kw)


def garbled_line_costs_one_event(w, original, after):
    events = records.read_metrics(w)
    assert [e["step"] for e in events if "val_loss" in e] == [0, 2]  # nothing after the garbled line lost
    assert len(events) == len((w / records.METRICS).read_text().splitlines())


def nothing_in_cwd(w, original, after):
    assert sorted(p.name for p in w.parent.iterdir()) == ["w"], "an empty --workdir wrote into the current directory"


CASES = [
    # ranges of every numeric flag, refused by name before anything is read or written
    train("negative lr trains by gradient ascent", "--lr=-0.01", message=r"--lr=-0\.01 must be a finite number > 0"),
    train("nan lr", "--lr=nan", message=r"--lr=nan must be a finite number > 0"),
    train("infinite lr", "--lr=inf", message=r"--lr=inf must be"),
    train("zero lr", "--lr=0", message=r"--lr=0\.0 must be"),
    train("negative weight decay", "--weight_decay=-0.1", message=r"--weight_decay=-0\.1 must be a finite number >= 0"),
    train("negative clip", "--clip_norm=-1", message=r"--clip_norm=-1\.0 must be"),
    train("negative seed", "--seed=-1", message=r"--seed=-1 must be >= 0"),
    train("negative eval_blocks", "--eval_blocks=-1", message=r"--eval_blocks=-1 must be >= 0"),
    train("negative snapshot_every", "--snapshot_every=-2", message=r"--snapshot_every=-2 must be"),
    train("negative max_steps", "--max_steps=-1", message=r"--max_steps=-1 must be >= 0"),
    train("val_fraction zero", "--val_fraction=0", message=r"--val_fraction=0\.0 must be strictly between 0 and 1"),
    train("val_fraction above one", "--val_fraction=1.5", message=r"--val_fraction=1\.5"),
    train("warmup_ratio one", "--warmup_ratio=1", message=r"--warmup_ratio=1\.0 must be in \[0, 1\)"),
    train("seq_len one", "--seq_len=1", message=r"--seq_len=1 must be at least 2"),
    train("batch_size zero", "--batch_size=0", message=r"--batch_size=0 must be at least 1"),
    train("grad_accum zero", "--grad_accum=0", message=r"--grad_accum=0 must be at least 1"),
    train("keep zero", "--keep=0", message=r"--keep=0 must be at least 1"),
    train("negative init noise", "--init_noise_scale=-1", message=r"--init_noise_scale=-1\.0 must be"),
    train("unknown optimizer", "--optimizer=sgd", message=r"--optimizer='sgd'; choose one of adafactor, adamw"),
    train("unknown schedule", "--schedule=step", message=r"--schedule='step'; choose one of cosine"),
    train("unknown init", "--init=zeros", message=r"--init='zeros'; choose one of"),
    train("unknown remat", "--remat=some", message=r"--remat='some'; choose one of"),
    train("unknown frozen dtype", "--frozen_dtype=int4", message=r"--frozen_dtype: unknown dtype 'int4'.*int8, nf4"),
    train("unknown compute dtype", "--compute_dtype=fp64", message=r"--compute_dtype: unknown dtype 'fp64'"),
    train("mesh larger than the devices", "--mesh=3,5", message=r"--mesh='3,5' needs 15 devices but \d+ are available"),
    train("mesh larger than the devices, preparing only", "--mesh=3,5", "--max_steps=0",
          message=r"--mesh='3,5' needs 15 devices but \d+ are available"),
    train("mesh not two integers", "--mesh=abc", message=r"--mesh='abc': expected two integers"),
    # multi-host flags: refused before JAX starts, never ignored
    train("coordinator without --distributed", "--coordinator_address=127.0.0.1:1234",
          message=r"--coordinator_address: used only with --distributed"),
    train("process id without --distributed", "--process_id=1", message=r"--process_id: used only with --distributed"),
    train("unresolvable coordinator", "--distributed", "--coordinator_address=nohost:1234", "--num_processes=2",
          "--process_id=0", message=r"the host 'nohost' does not resolve"),
    train("coordinator without a port", "--distributed", "--coordinator_address=127.0.0.1", "--num_processes=2",
          "--process_id=0", message=r"give the coordinator as HOST:PORT"),
    train("process id out of range", "--distributed", "--coordinator_address=127.0.0.1:1234", "--num_processes=2",
          "--process_id=2", message=r"0 <= --process_id < --num_processes"),
    train("seq_len beyond the model's positions", "--seq_len=1024", message=r"exceeds max_position_embeddings=512"),
    # paths and sources
    train("empty workdir", "--workdir=", message=r"--workdir is empty", check=nothing_in_cwd),
    train("empty model", "--model=", message=r"--model is empty"),
    train("real model without corpus and lexicon", "--model={T}/absent", message=r"--corpus and --lexicon are required"),
    train("missing model directory", "--model={T}/absent", "--corpus={T}/c.txt", "--lexicon={T}/l.txt",
          message=r"absent: no such checkpoint directory"),
    train("missing corpus", "--corpus={T}/absent.txt", message=r"corpus file .*absent\.txt does not exist"),
    train("corpus not UTF-8", "--corpus={T}/latin1.txt", setup=write("latin1.txt", "café riverrun".encode("latin-1")),
          message=r"latin1\.txt"),
    train("empty lexicon", "--lexicon={T}/empty.txt", setup=write("empty.txt", b"\n\n"), message=r"has no words"),
    train("lexicon with a space", "--lexicon={T}/spaced.txt", setup=write("spaced.txt", b"river run\n"),
          message=r"spaced\.txt:1: 'river run' contains whitespace"),
    # flags that do not parse: one line, exit 2
    train("unknown flag", "--bogus=1", code=2, message=r"Unknown command line flag 'bogus'"),
    train("non-integer max_steps", "--max_steps=abc", code=2, message=r"flag --max_steps=abc"),
    train("positional argument", "extra", code=2, message=r"unexpected arguments \['extra'\]; every setting is a --flag"),
    # a workdir that holds another run
    train("changed setting", "--lr=0.02", message=r"holds a run with other settings: --lr: 0\.01 -> 0\.02"),
    train("shrinking a finished run", "--max_steps=1", "--allow_config_change",
          message=r"already holds a checkpoint at step 2, past --max_steps=1; a run cannot be shortened"),
    train("truncated config.json", setup=truncate("config.json"), message=r"config\.json is not valid JSON"),
    train("busy workdir", hold_lock=True, message=r"is in use by another wake2vec run"),
    train("tilde in workdir resumes the run", "--workdir=~/w", code=0, message=r"resuming from the committed checkpoint at step 2"),
    # derived files: verified when read, rebuilt with a warning, never a silent change
    train("flipped bit in embeddings_pre.npy", code=0, setup=flip_byte("embeddings_pre.npy"),
          repaired=("embeddings_pre.npy",), message=r"embeddings_pre\.npy does not match the sha256 in config\.json"),
    train("changed id in the token cache", code=0, setup=change_one_token_id, repaired=("corpus_tokens",),
          message=r"corpus token cache .* does not match config\.json .*re-tokenizing"),
    train("truncated token cache", code=0, setup=truncate_token_cache, repaired=("corpus_tokens",),
          message=r"corpus token cache .* is unreadable .*re-tokenizing"),
    train("edited tokenizer.json is rewritten", code=0, setup=edit_tokenizer_json, repaired=("tokenizer/tokenizer.json",),
          message=r"resuming"),
    train("garbled metrics line", code=0, setup=garble_metrics_line,
          # they lose that one event, and so does TensorBoard's mirror of metrics.jsonl
          repaired=(records.METRICS, records.LOSS_TABLE, records.LOSS_CURVE, "tensorboard/events"),
          message=r"metrics\.jsonl line 2 is damaged; skipped \(the events after it are kept\)",
          check=garbled_line_costs_one_event),
    train("torn last metrics line", code=0, setup=tear_last_metrics_line, repaired=(records.METRICS,), message=r"resuming"),
    train("events after the last commit", code=0, setup=log_past_the_checkpoint, repaired=(records.METRICS,),
          message=r"resuming"),
    train("leftover partial demo model", code=0, setup=leftover_partial_demo_model, message=r"resuming"),
    # analyze
    Case("analyze: not a workdir", "analyze", ("--workdir={T}",), 1, r"config\.json not found: is .* a wake2vec training workdir"),
    Case("analyze: no such step", "analyze", ("--workdir={W}", "--step=7"), 1, r"no committed checkpoint at step 7; it has \[2\]"),
    Case("analyze: no checkpoint yet", "analyze", ("--workdir={W}",), 1, r"no committed checkpoint in .*: train first", base="prepared"),
    Case("analyze: text file as --post", "analyze", ("--post={T}/t.npy", "--base_vocab_size=10"), 1,
         r"t\.npy is not a readable \.npy file", setup=write("t.npy", b"riverrun\n")),
    Case("analyze: truncated config.json", "analyze", ("--workdir={W}",), 1, r"config\.json is not valid JSON",
         setup=truncate("config.json")),
    Case("analyze: negative seed", "analyze", ("--workdir={W}", "--seed=-3"), 1, r"--seed=-3 must be >= 0"),
    Case("analyze: workdir and post", "analyze", ("--workdir={W}", "--post={T}/t.npy"), 1, r"exactly one of --workdir or --post"),
    Case("analyze: unwritable out_dir", "analyze", ("--workdir={W}", "--out_dir={W}/config.json/analysis"), 1,
         r"cannot write to .*config\.json/analysis \(Not a directory\); pass a writable --out_dir"),
    Case("analyze: flipped embeddings_pre.npy", "analyze", ("--workdir={W}",), 1,
         r"embeddings_pre\.npy does not match the sha256 recorded", setup=flip_byte("embeddings_pre.npy")),
    Case("analyze: edited tokenizer", "analyze", ("--workdir={W}",), 1, r"tokenizer\.json does not match the sha256",
         setup=edit_tokenizer_json),
    # generate
    Case("generate: no workdir", "generate", (), 1, r"--workdir is required"),
    Case("generate: no checkpoint yet", "generate", ("--workdir={W}",), 1, r"no committed checkpoint in .*: train first", base="prepared"),
    Case("generate: no such step", "generate", ("--workdir={W}", "--step=7"), 1, r"no committed checkpoint at step 7"),
    Case("generate: bad temperature", "generate", ("--workdir={W}", "--temperatures=0.5,warm"), 1, r"'warm' is not a number"),
    Case("generate: top_p above one", "generate", ("--workdir={W}", "--top_p=1.5"), 1, r"top_p=1\.5"),
    Case("generate: never replaces the run's generations.md", "generate", ("--workdir={W}",), 1,
         r"generations\.md exists .*pass --out=OTHER\.md, or --overwrite", setup=write("w/generations.md", b"the run's\n")),
    Case("generate: prompt longer than the positions", "generate",
         ("--workdir={W}", "--prompt=" + "riverrun " * 600, "--temperatures=0"), 1,
         r"leaves no room for new tokens within the model's max_position_embeddings=512; shorten the prompt"),
    Case("generate: --out beside the run's file", "generate",
         ("--workdir={W}", "--out={W}/other.md", "--temperatures=0", "--max_new_tokens=4"), 0, r"wrote .*other\.md",
         setup=write("w/generations.md", b"the run's\n")),
    Case("generate: --out in a path that cannot be written", "generate", ("--workdir={W}", "--out={W}/config.json/g.md"),
         1, r"cannot write to .*; pass a writable --out"),
    # export
    Case("export: no out", "export", ("--workdir={W}",), 1, r"--workdir and --out are both required"),
    Case("export: out not empty", "export", ("--workdir={W}", "--out={W}/tokenizer"), 1, r"is not empty"),
    Case("export: not a workdir", "export", ("--workdir={T}", "--out={T}/hf"), 1, r"config\.json not found"),
    Case("export: no such step", "export", ("--workdir={W}", "--out={T}/hf", "--step=7"), 1, r"no committed checkpoint at step 7"),
    Case("export: out under a file", "export", ("--workdir={W}", "--out={W}/config.json/hf"), 1, r"cannot write to .*; pass a writable --out"),
    # train_p2
    Case("train_p2: mesh larger than the devices, preparing only", "train_p2",
         ("--workdir={T}/p2", "--phase1={W}", "--max_steps=0", "--mesh=3,5"), 1,
         r"--mesh='3,5' needs 15 devices but \d+ are available"),
    # train_p3
    Case("train_p3: no such --phase2", "train_p3", ("--workdir={T}/p3", "--phase2={T}/nope"), 1,
         r"--phase2=.*nope: no such directory; train it first \(python -m experiments\.train_p2"),
    # build_lexicon
    Case("lexicon: missing flags", "lexicon", (), 1, r"--corpus, --tokenizer, --out required"),
    Case("lexicon: min_count zero", "lexicon",
         ("--corpus={W}/demo_sources/lexicon.txt", "--tokenizer={W}/tokenizer", "--out={T}/l.txt", "--min_count=0"), 1,
         r"--min_count=0 must be at least 1"),
    Case("lexicon: bad frequency list", "lexicon",
         ("--corpus={W}/demo_sources/lexicon.txt", "--tokenizer={W}/demo_sources/base_model", "--out={T}/l.txt",
          "--frequency_list={T}/f.txt"), 1, r"f\.txt:1: expected 'word<TAB>count'", setup=write("f.txt", b"riverrun lots\n")),
]


def _file_digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_or_fault(case: Case, runs, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(runs[case.base], workdir)
    original = snapshot(workdir, runs[case.base])
    if case.setup is not None:
        case.setup(workdir)
    damaged = snapshot(workdir, runs[case.base])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    args = [a.format(W=workdir, T=tmp_path) for a in case.args]
    with open(workdir / ".lock", "w") as lock:
        if case.hold_lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = invoke(case.launcher, *args)
    out = capsys.readouterr()
    output = out.err + out.out
    assert code == case.code, output[-3000:]
    assert re.search(case.message, output), output[-3000:]
    if case.code == 1:
        errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and re.search(case.message, errors[0]), out.err[-3000:]
        assert "Traceback" not in out.err
    after = snapshot(workdir, runs[case.base])
    for rel, digest in damaged.items():
        repaired = any(rel.startswith(prefix) for prefix in case.repaired)
        if repaired and case.check is None:
            assert after.get(rel) == original[rel], f"{rel} was not restored"
        elif not repaired:
            assert after.get(rel) == digest, f"{rel} changed"
    if case.check is not None:
        case.check(workdir, original, after)


def test_the_table_has_forty_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


# ------------------------------------------------------------------ failures that are not inputs


def _failing(error: BaseException):
    def command(cfg):
        raise error
    return command


def test_out_of_memory_keeps_its_traceback_and_names_the_memory_flags(capsys):
    from jax.errors import JaxRuntimeError

    oom = JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.")
    code = launcher.main(export_hf.ExportConfig, _failing(oom), "", ["export"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "RESOURCE_EXHAUSTED" in err
    for flag in ("--frozen_dtype", "--remat", "--batch_size", "--grad_accum"):
        assert flag in err.splitlines()[-1]


def test_an_internal_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        launcher.main(export_hf.ExportConfig, _failing(ZeroDivisionError("a bug")), "", ["export"])


def test_a_value_error_is_a_bug_not_a_user_error():
    """Only wake2vec.errors.UserError becomes one line; a bare ValueError is a bug's traceback."""
    with pytest.raises(ValueError):
        launcher.main(export_hf.ExportConfig, _failing(ValueError("internal")), "", ["export"])


def test_the_first_error_is_the_one_shown(runs, tmp_path, monkeypatch, capsys):
    """A full disk fails the save, then the loss table on the same disk: the user sees the first."""
    from wake2vec.training import checkpoint, loop

    workdir = tmp_path / "w"
    shutil.copytree(runs["prepared"], workdir)

    def disk_full_save(self, state, *, val_loss=None):
        raise checkpoint.CheckpointDiskFullError(f"saving step {int(state.step)}: the disk is full")

    def table_on_full_disk(workdir, events):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", disk_full_save)
    monkeypatch.setattr(loop.records, "write_loss_table", table_on_full_disk)
    code = invoke("train", f"--workdir={workdir}", *FAST, "--max_steps=2")
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == "error: saving step 2: the disk is full", err[-2000:]
    assert "after CheckpointDiskFullError, stopping also failed: OSError" in err and "Traceback" not in err


def test_help_lists_each_launchers_own_flags_and_exits_zero(capsys):
    for name, (config_cls, command, doc, adjust) in LAUNCHERS.items():
        assert launcher.main(config_cls, command, doc, [name, "--help"], adjust=adjust) == 0
        text = capsys.readouterr().out
        for field in dataclasses.fields(config_cls):
            assert f"  --{field.name}  (default: " in text, (name, field.name)
        assert "--verbosity" in text
    assert launcher.main(*LAUNCHERS["train"][:3], ["train", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the docstring's example keeps its lines: one flag group per line, as written
    assert "        --model=TinyLlama/TinyLlama-1.1B-Chat-v1.0 \\" in lines


def test_help_as_a_process_exits_zero():
    out = subprocess.run([sys.executable, "-m", "experiments.analyze", "--help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "  --post  (default: " in out.stdout


def test_generate_flag_defaults_are_the_study_settings():
    from wake2vec.models import generate

    study = generate.GenerationSettings()
    cfg = generate_cli.GenerateConfig()
    assert cfg.prompt == study.prompt and generate_cli.parse_temperatures(cfg.temperatures) == study.temperatures
    for name in ("max_new_tokens", "top_k", "top_p", "repetition_penalty", "seed"):
        assert getattr(cfg, name) == getattr(study, name), name


def test_quiet_by_default_and_verbosity_brings_the_library_lines_back(runs, capsys):
    # Opening the checkpoints read-only makes Orbax warn "Given directory is read only"; a
    # missing step then ends the command cheaply, after the reader was opened.
    args = (f"--workdir={runs['trained']}", "--step=7", f"--out_dir={runs['trained'].parent / 'quiet'}")
    assert invoke("analyze", *args) == 1
    quiet = capsys.readouterr().err
    assert "Given directory is read only" not in quiet and "Unable to initialize backend" not in quiet
    assert quiet.splitlines() == [line for line in quiet.splitlines() if line.startswith("error: ")], quiet
    assert invoke("analyze", *args, "--verbosity=1") == 1
    assert "Given directory is read only" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_and_exits_130(runs, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(runs["prepared"], workdir)
    original = snapshot(workdir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", *FAST, "--max_steps=100000"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    # Far more steps than can run before the signal lands, even when a loaded machine starves this reader:
    # at 1,000 the run twice finished (exit 0) before SIGINT arrived.
    for line in proc.stderr:  # wait until training steps run
        seen.append(line)
        if re.search(r"step \d+/100000", line):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == launcher.EXIT_INTERRUPTED, err[-3000:]
    assert err.splitlines()[-1] == launcher.INTERRUPTED and "Traceback" not in err
    after = snapshot(workdir)
    for rel in ("embeddings_pre.npy", "tokenizer/tokenizer.json", "demo_sources/base_model/model.safetensors"):
        assert after[rel] == original[rel], rel


def test_the_first_ctrl_c_waits_for_the_step_boundary_and_the_second_interrupts():
    from wake2vec.training import interrupt

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a launcher's process (xdist workers differ)
    with interrupt.at_step_boundaries() as requested:
        assert not requested()
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread at its next bytecode
        time.sleep(0.05)
        assert requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.signal(signal.SIGINT, before) is signal.default_int_handler


def test_preparing_then_training_is_not_a_config_change(runs):
    record = json.loads((runs["trained"] / records.CONFIG).read_text())
    assert record["flags"]["max_steps"] == TRAINED_STEPS and record["config_changes"] == []


def test_preparing_reads_only_the_table_rows_and_hashes_each_source_once(runs, tmp_path, monkeypatch, capsys):
    from wake2vec.models import convert

    workdir = tmp_path / "w"
    shutil.copytree(runs["prepared"], workdir)
    hashed = []
    real_hash = convert.source_hash
    monkeypatch.setattr(convert, "source_hash", lambda d: hashed.append(d) or real_hash(d))

    def no_body(*args, **kwargs):
        raise AssertionError("--max_steps=0 read the whole body")

    monkeypatch.setattr(convert, "load_hf", no_body)
    prepare_only = ("train", f"--workdir={workdir}", *FAST, "--max_steps=0")
    assert invoke(*prepare_only) == 0
    assert len(hashed) == 1  # a new path: hashed in full, then cached
    assert invoke(*prepare_only) == 0
    assert len(hashed) == 1  # same files, same size and mtime: the cached hash
    weights = workdir / "demo_sources" / "base_model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert invoke(*prepare_only) == 0
    assert len(hashed) == 2  # touched: hashed again (and found unchanged)
    capsys.readouterr()


def test_distributed_with_no_cluster_to_detect_says_what_to_pass(tmp_path):
    """In a fresh process: JAX's cluster detection runs only before any other JAX call."""
    out = subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={tmp_path / 'w'}", "--distributed"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "OMPI", "TPU"))})
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: --distributed found no cluster to join"), out.stderr
    assert not (tmp_path / "w").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory nothing can write into: a read-only bind mount as root (chmod does
    not stop root), chmod 555 otherwise."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    for cmd in (["mount", "--bind", "-o", "ro", str(target), str(target)], ["mount", "-o", "remount,ro,bind", str(target)]):
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount: {' '.join(cmd)} failed")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_a_read_only_workdir_is_one_line_naming_the_flag(read_only_dir, capsys):
    code = invoke("train", f"--workdir={read_only_dir}", *FAST, "--max_steps=0")
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert re.fullmatch(r"error: cannot write to .*ro \(.*\); pass a writable --workdir", err.splitlines()[-1]), err[-2000:]


def test_too_little_disk_for_two_checkpoints_is_one_line_and_nothing_else(mount_tmpfs):
    # The demo's checkpoint is about 1.8 MB: a 5 MiB disk holds the token cache and the tables, not two of them.
    workdir = mount_tmpfs("5m") / "w"
    run = subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", "--max_steps=4"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == launcher.EXIT_USER_ERROR, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir / 'checkpoints'}: ") and "room for two checkpoints" in last, last
    assert "Traceback" not in run.stderr, run.stderr[-3000:]  # an Orbax manager left open printed one at exit
