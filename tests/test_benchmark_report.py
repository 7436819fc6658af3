"""The benchmark's busy-machine line: other processes' share of the CPU time while it timed."""

import os

from benchmarks import benchmark


def test_load_report_subtracts_this_process_and_flags_a_busy_machine():
    ticks = os.sysconf("SC_CLK_TCK")
    cores = len(os.sched_getaffinity(0))
    # 10 s of wall on every core: `total` jiffies; 6 s of them busy, 2 s of which were ours.
    total = 10 * cores * ticks
    start, end = (1000, 5000), (1000 + 6 * ticks, 5000 + total)
    line = benchmark.load_report(start, end, own_cpu_s=2.0)
    assert f"other processes used {4 / (10 * cores):.0%} of its CPU time" in line
    assert ("BUSY" in line) == (4 / (10 * cores) > 0.1)
    quiet = benchmark.load_report(start, (1000 + 2 * ticks, 5000 + total), own_cpu_s=2.0)
    assert "used 0% of its CPU time -> idle" in quiet


def test_load_report_without_proc_stat_still_gives_the_load_average():
    line = benchmark.load_report(None, None, own_cpu_s=1.0)
    assert "load average" in line and "/proc/stat unavailable" in line
