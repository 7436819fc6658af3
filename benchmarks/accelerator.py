"""One run that checks an accelerator: TinyLlama's Phase 1 step against torch's, and the device tests.

    python -m benchmarks.accelerator                   # a GPU: TinyLlama's shape and the tests (aimed at <= 4 min; not yet timed on one)
    python -m benchmarks.accelerator --tests=false     # the step alone
    python -m benchmarks.accelerator --reduced         # the small shape, e.g. to try the script on a CPU

No GPU has been lent to the sessions that build wake2vec, so everything it knows about GPU
speed comes from the CPU compiler. This script is what a first device run should execute:
in one process, on one device, it writes one JSON file and one markdown page with

* the device and the versions of jax, jaxlib, torch and transformers;
* the Phase 1 step at TinyLlama-1.1B's shape with the Wake's tied 76,500-row table (bf16
  frozen body, bf16 compute, the float32 table the only trainable tensor), as the launcher
  places and compiles it (benchmarks.benchmark.wake2vec_step), against transformers'
  LlamaForCausalLM on the same device under the same policy (bf16 body, float32 table,
  torch.autocast bf16, SDPA attention, transformers' Adafactor, clip 1.0, gradient
  checkpointing where remat is full), at three configurations: 16 x 256 tokens without
  and with remat, and the study's 1 x 256 x 16 accumulation;
* per configuration the tokens/s of both and their ratio, wake2vec's MFU against a bf16
  matmul peak measured in the same run on the same device, and both peak memories;
* the GPU-relevant tests (`pytest -m accelerator`: model parity, the train step, the
  families) re-run under the float32 precision policy, as passed / failed counts.

On a CPU it runs a reduced shape (`--reduced`, the default there) so that it keeps working
where it is tested (tests/test_accelerator.py); those figures say nothing about a GPU.

Memory: jax's figure is the device allocator's high-water mark (`memory_stats()`), which
only grows within a process, so the configurations run from the smallest expected
footprint up and each one's figure is the mark after it; where a backend keeps no such
statistics (the CPU) it is XLA's compiled memory analysis of that configuration's step.
"""

from __future__ import annotations

import os

# jax's default reserves 75% of a GPU at start-up, which would leave torch too little room.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from benchmarks import benchmark  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINYLLAMA = {k: v for k, v in benchmark.SHAPES["tinyllama"].items() if k not in ("batch", "accum", "repeats")}
# Small enough for a 2-core CPU in seconds; head_dim 64 as TinyLlama's.
REDUCED = dict(vocab=4096, hidden=256, mlp=688, layers=2, heads=4, kv_heads=1, seq=64)
COMPUTE_DTYPE = "bfloat16"

_REDUCED = flags.DEFINE_bool("reduced", None, "Run the reduced shape; default: true when jax's backend is the CPU.")
_TESTS = flags.DEFINE_bool(
    "tests", None, "Also run `pytest -m accelerator` under the precision policy; default: true off the CPU.")
_STEPS = flags.DEFINE_integer("timed_steps", 5, "Timed steps per contender and configuration, after one warm-up step.")
_OUT_JSON = flags.DEFINE_string("out_json", "", "The JSON report; default docs/benchmarks/accelerator_<platform>.json.")
_OUT_MD = flags.DEFINE_string("out_md", "", "The markdown page; default docs/benchmarks/accelerator_<platform>.md.")


@dataclasses.dataclass(frozen=True)
class Configuration:
    batch: int
    accum: int
    remat: str

    def label(self, seq: int) -> str:
        blocks = f"{self.batch} x {seq}" + (f" x {self.accum}" if self.accum > 1 else "")
        return f"{blocks}, remat {self.remat}"


def configurations(reduced: bool) -> list[Configuration]:
    """Smallest expected footprint first (see the module's note on memory): accumulation, then remat, then none."""
    batch, accum = (4, 4) if reduced else (16, 16)
    return [Configuration(1, accum, "full"), Configuration(batch, 1, "full"), Configuration(batch, 1, "none")]


def environment() -> dict:
    """Where the figures come from: the device as jax and torch see it, and the versions."""
    import jax
    import jaxlib
    import torch
    import transformers

    device = jax.devices()[0]
    cuda = torch.cuda.is_available() and device.platform == "gpu"
    return {
        "platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
        "torch_device": "cuda" if cuda else "cpu", "torch_device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
    }


def jax_memory(compiled) -> tuple[int, str]:
    """(bytes, what they are): the device's high-water mark where it keeps one, else XLA's plan of the step."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), ("device.memory_stats()['peak_bytes_in_use'], the process's high-water mark "
                                                   "after the configuration (they run smallest first)")
    return int(benchmark.compiled_peak_bytes(compiled)), "XLA's compiled memory_analysis (arguments + outputs + temporaries - aliased)"


def torch_memory(device: str) -> tuple[int | None, str]:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    return None, "not available on CPU"


def measure(shape: dict, config: Configuration, inputs: dict, make_torch_run, torch_device: str, steps: int) -> dict:
    """One configuration: both contenders timed alternately, with the peak sampled between rounds."""
    import torch

    step_shape = {**shape, "batch": config.batch, "accum": config.accum}
    if torch_device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours, compiled = benchmark.wake2vec_step(
        {**inputs, "batch": benchmark.token_batch(step_shape, inputs["placement"])}, config.remat, COMPUTE_DTYPE)
    theirs = make_torch_run(config.remat, (config.accum, config.batch, shape["seq"]))
    timings = benchmark.time_contenders({"wake2vec": ours, "pytorch": theirs}, warmup=1, repeats=steps,
                                        gap=0.5 if benchmark.on_cpu() else 0.0,
                                        peak=lambda: benchmark.matmul_peak_flops(COMPUTE_DTYPE, repeats=3))
    tokens = config.batch * config.accum * shape["seq"]
    flops, hardware = benchmark.step_flops(step_shape, config.remat)
    peak = timings.peak()[0]
    jax_bytes, jax_source = jax_memory(compiled)
    torch_bytes, torch_source = torch_memory(torch_device)
    rates = {c: tokens / timings.median_wall(c) for c in ("wake2vec", "pytorch")}
    result = {
        "configuration": config.label(shape["seq"]), "batch": config.batch, "accum": config.accum, "seq": shape["seq"],
        "remat": config.remat, "tokens_per_step": tokens,
        "wake2vec": {"step_s": timings.median_wall("wake2vec"), "tokens_per_s": rates["wake2vec"],
                     "peak_memory_bytes": jax_bytes, "memory_source": jax_source,
                     "compiled_memory_bytes": int(benchmark.compiled_peak_bytes(compiled))},
        "pytorch": {"step_s": timings.median_wall("pytorch"), "tokens_per_s": rates["pytorch"],
                    "peak_memory_bytes": torch_bytes, "memory_source": torch_source},
        "ratio": rates["wake2vec"] / rates["pytorch"],
        "model_flops": flops, "hardware_flops": hardware, "matmul_peak_flops_per_s": peak,
        "mfu": flops / timings.median_wall("wake2vec") / peak,
    }
    if benchmark.on_cpu():  # the figure a shared CPU leaves honest, and how shared it was
        result["cpu_s_per_step"] = {c: statistics.median(timings.cpus[c]) for c in timings.cpus}
        result["machine"] = timings.load
    del ours, compiled, theirs
    gc.collect()
    return result


TESTS_COMMAND = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", "accelerator", "tests"]
TESTS_ENV = {"WAKE2VEC_MATMUL_PRECISION": "highest"}


def pytest_counts(output: str) -> dict[str, int]:
    """The counts of pytest's closing summary line ('3 passed, 1 skipped in 2.0s'), by outcome."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if not lines:
        return {}
    return {("errors" if word.startswith("error") else word): int(n)
            for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", lines[-1])}


def run_tests() -> dict:
    """The accelerator-marked tests in a subprocess, under the precision policy for float32."""
    started = time.perf_counter()
    done = subprocess.run(TESTS_COMMAND, cwd=ROOT, env={**os.environ, **TESTS_ENV}, capture_output=True, text=True)
    counts = pytest_counts(done.stdout)
    return {"ran": True, "command": " ".join(["python", *TESTS_COMMAND[1:]]), "env": TESTS_ENV, "returncode": done.returncode,
            "seconds": time.perf_counter() - started, "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("errors", 0), "counts": counts,
            "output_tail": done.stdout[-2000:] if done.returncode else ""}


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def render(report: dict) -> str:
    """The markdown page: where it ran, the three configurations, the tests, and how to regenerate it."""
    env, rows = report["environment"], report["configurations"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"# The accelerator check on {env['device_kind']} ({env['platform']})", "",
        f"Regenerate: `{report['command']}` (benchmarks/accelerator.py). {versions}; torch on "
        f"{env['torch_device_name']}. Shape: {report['shape_name']} {report['shape']}; bf16 body and compute, "
        f"the float32 tied table the only trainable tensor, on both sides. {report['timed_steps']} timed steps per "
        f"contender after one warm-up, alternating; medians.", "",
        "| configuration | wake2vec tokens/s | PyTorch tokens/s | ratio | MFU (bf16 peak) | wake2vec peak memory | PyTorch peak memory |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(f"| {row['configuration']} | {row['wake2vec']['tokens_per_s']:,.0f} | {row['pytorch']['tokens_per_s']:,.0f} "
                     f"| {row['ratio']:.2f}x | {row['mfu']:.0%} of {row['matmul_peak_flops_per_s'] / 1e12:.3g} TFLOP/s "
                     f"| {_gib(row['wake2vec']['peak_memory_bytes'])} | {_gib(row['pytorch']['peak_memory_bytes'])} |")
    lines += ["", f"wake2vec's memory: {rows[0]['wake2vec']['memory_source']}; PyTorch's: {rows[0]['pytorch']['memory_source']}."]
    if report["shape_name"] == "reduced":
        lines += ["", "A reduced shape, so that the script keeps working where no GPU is: its figures say nothing "
                      "about a GPU (on a CPU, torch's bf16 autocast is not the path anyone trains on)."]
    notes = [f"* {row['configuration']}: wake2vec {row['cpu_s_per_step']['wake2vec']:.2f}, PyTorch "
             f"{row['cpu_s_per_step']['pytorch']:.2f} CPU-s per step; {row['machine']}" for row in rows if "machine" in row]
    lines += ["", *notes] if notes else []
    tests = report["tests"]
    lines += ["", (f"Tests: `{tests['env']} {tests['command']}`: {tests['passed']} passed, {tests['failed']} failed "
                   f"in {tests['seconds']:.0f} s." if tests.get("ran", True) else f"Tests: not run ({tests['why']}).")]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import jax
    import torch

    started = time.perf_counter()
    env = environment()
    on_cpu = benchmark.on_cpu()
    reduced = on_cpu if _REDUCED.value is None else _REDUCED.value
    with_tests = (not on_cpu) if _TESTS.value is None else _TESTS.value
    shape = REDUCED if reduced else TINYLLAMA
    print(f"{env['device_kind']} ({env['platform']}); torch on {env['torch_device_name']}; {env['versions']}", flush=True)
    # One model, placement and optimiser for every configuration; each brings its own batch.
    inputs = benchmark.wake2vec_inputs({**shape, "batch": 1, "accum": 1}, frozen_dtype=COMPUTE_DTYPE)
    make_torch_run = benchmark.torch_step({**shape, "batch": 1, "accum": 1}, device=env["torch_device"],
                                          body_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16,
                                          attn_implementation="sdpa")
    rows = []
    for config in configurations(reduced):
        row = measure(shape, config, inputs, make_torch_run, env["torch_device"], _STEPS.value)
        print(f"{row['configuration']}: wake2vec {row['wake2vec']['tokens_per_s']:,.0f} tokens/s, PyTorch "
              f"{row['pytorch']['tokens_per_s']:,.0f} ({row['ratio']:.2f}x); MFU {row['mfu']:.0%} of a bf16 peak of "
              f"{row['matmul_peak_flops_per_s'] / 1e12:.3g} TFLOP/s; memory {_gib(row['wake2vec']['peak_memory_bytes'])} "
              f"/ {_gib(row['pytorch']['peak_memory_bytes'])}", flush=True)
        rows.append(row)
    del inputs, make_torch_run
    gc.collect()
    tests = run_tests() if with_tests else {"ran": False, "why": "--tests=false" if _TESTS.value is False else "on a CPU; --tests runs them"}
    if with_tests:
        print(f"tests: {tests['passed']} passed, {tests['failed']} failed in {tests['seconds']:.0f} s", flush=True)
    command = " ".join(["python -m benchmarks.accelerator", *sys.argv[1:]])
    report = {"command": command, "date": time.strftime("%Y-%m-%d"), "environment": env, "shape_name": "reduced" if reduced else "tinyllama",
              "shape": shape, "compute_dtype": COMPUTE_DTYPE, "timed_steps": _STEPS.value, "configurations": rows,
              "tests": tests, "seconds": time.perf_counter() - started}
    out = ROOT / "docs" / "benchmarks" / f"accelerator_{jax.devices()[0].platform}"
    json_path = pathlib.Path(_OUT_JSON.value or f"{out}.json")
    md_path = pathlib.Path(_OUT_MD.value or f"{out}.md")
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(render(report), encoding="utf-8")
    print(f"wrote {json_path} and {md_path} in {report['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
