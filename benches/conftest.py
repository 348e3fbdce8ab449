"""Prints a per-position summary for benchmarks that declare ``extra_info["positions"]``, and the
peak-memory measurements, as markdown tables after pytest-benchmark's own table."""

from __future__ import annotations

import pytest


def _benchmarks(config):
    session = getattr(config, "_benchmarksession", None)
    return [bench for bench in getattr(session, "benchmarks", []) if bench and not bench.has_error]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    benchmarks = _benchmarks(config)
    timed = [bench for bench in benchmarks if "positions" in bench.extra_info]
    if timed:
        baseline = next((b for b in timed if b.name == "test_rust_dense"), None)
        base_us = baseline.stats.min * 1e6 / baseline.extra_info["positions"] if baseline else None
        lines = [
            "",
            "| benchmark | completion positions | min (ms) | median (ms) | µs / position (min) | µs / position (median) | × Rust dense |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for bench in timed:
            positions = bench.extra_info["positions"]
            per_min = bench.stats.min * 1e6 / positions
            per_median = bench.stats.median * 1e6 / positions
            relative = f"{per_min / base_us:.1f}" if base_us else "n/a"
            lines.append(
                f"| {bench.name} | {positions:,} | {bench.stats.min * 1e3:.2f} | {bench.stats.median * 1e3:.2f} "
                f"| {per_min:.3f} | {per_median:.3f} | {relative} |"
            )
        terminalreporter.write_sep("-", "sdft kernel: time per completion position")
        terminalreporter.write_line("\n".join(lines))
    memory = [bench for bench in benchmarks if "peak_over_output" in bench.extra_info]
    if memory:
        lines = [
            "",
            "| benchmark | output (MiB) | peak RSS growth (MiB) | peak growth / output |",
            "|---|---:|---:|---:|",
        ]
        for bench in memory:
            info = bench.extra_info
            lines.append(
                f"| {bench.name} | {info['output_bytes'] / 2**20:.1f} | {info['peak_increase'] / 2**20:.1f} "
                f"| {info['peak_over_output']:.2f} |"
            )
        terminalreporter.write_sep("-", "sdft kernel: peak memory of one recipe-scale call")
        terminalreporter.write_line("\n".join(lines))
