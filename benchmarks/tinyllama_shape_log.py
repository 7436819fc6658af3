"""A TinyLlama-1.1B-shape training log: what the progress lines say at the real scale.

    python -m benchmarks.tinyllama_shape_log [--shared_data=../shared/data] \
        [--dir=/tmp/wake2vec_tinyllama_shape] [--out=docs/tinyllama_shape_log.txt] [--keep]

Writes a seeded random bf16 checkpoint at TinyLlama-1.1B's shape (benchmarks.convert_memory),
then runs the real launcher on it with the Wake, the TinyLlama tokenizer and the 44,990-word
lexicon from the shared fixtures (76,500 rows after injection): three steps of one 256-token
block, an eval of two blocks at steps 2 and 3 and a checkpoint at each. The weights are
random, so the losses mean nothing; the step rate, the eval and save times and the compile
time are what the log is for. The launcher's log lines go to --out, under
the command and the host's core count, for BUILD.md to quote.
"""

from __future__ import annotations

import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

from absl import app, flags

from benchmarks import convert_memory

_REPO = pathlib.Path(__file__).resolve().parents[1]
_SHARED = flags.DEFINE_string("shared_data", str(_REPO.parent / "shared" / "data"),
                              "folder with finnegans_wake.txt, wake_lexicon.txt and tinyllama_tokenizer/")
_OUT = flags.DEFINE_string("out", str(_REPO / "docs" / "tinyllama_shape_log.txt"), "the log excerpt written here")
# --dir (where the checkpoint, and here the run, go) and --keep are convert_memory's flags.
_DIR, _KEEP = convert_memory._DIR, convert_memory._KEEP

# One block per step (not the reference's 16 accumulated): at ~30 CPU-s per block on two
# cores, three steps show the rate without an hour's wait; the per-token rate is the same.
SCHEDULE = ["--seq_len=256", "--batch_size=1", "--grad_accum=1", "--max_steps=3", "--log_every=1",
            "--eval_every=2", "--save_every=2", "--eval_blocks=2", "--frozen_dtype=bfloat16",
            "--compute_dtype=float32", "--analyze=false"]


def main(argv):
    del argv
    shared, directory = pathlib.Path(_SHARED.value), pathlib.Path(_DIR.value)
    model_dir, workdir = directory / "model", directory / "run"
    if not (model_dir / "model.safetensors").is_file():
        convert_memory.write_random_checkpoint(model_dir, "bfloat16")
    shutil.rmtree(workdir, ignore_errors=True)
    command = [sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", f"--model={model_dir}",
               f"--tokenizer={shared / 'tinyllama_tokenizer'}", f"--corpus={shared / 'finnegans_wake.txt'}",
               f"--lexicon={shared / 'wake_lexicon.txt'}", "--start_marker=riverrun", *SCHEDULE]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=_REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode:
        sys.exit(out.stderr[-5000:])
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = out.stderr.splitlines()
    shown = " ".join(["python -m experiments.train_p1", "--model=<random bf16 TinyLlama-1.1B shape>",
                      "--tokenizer=tinyllama_tokenizer --corpus=finnegans_wake.txt --lexicon=wake_lexicon.txt",
                      "--start_marker=riverrun", *SCHEDULE])
    header = [f"# {shown}",
              f"# host: {os.cpu_count()} CPU cores, shared with other jobs; the whole launch took "
              f"{cpu.ru_utime + cpu.ru_stime:.0f} CPU-s in {wall:.0f} s wall",
              "# regenerate with: python -m benchmarks.tinyllama_shape_log"]
    pathlib.Path(_OUT.value).write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if not _KEEP.value:
        shutil.rmtree(directory)


if __name__ == "__main__":
    app.run(main)
