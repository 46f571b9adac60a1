"""Prints, after a benchmark run, each group's median per implementation and the speedup of
dsv4rs over torch eager."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    import bench_ops_cpu

    if not bench_ops_cpu.MEDIANS:
        return
    terminalreporter.section("dsv4rs vs torch eager (median)")
    for group, medians in bench_ops_cpu.MEDIANS.items():
        if {"dsv4rs", "torch"} <= medians.keys():
            ours, theirs = medians["dsv4rs"], medians["torch"]
            terminalreporter.write_line(
                f"{group:<62} dsv4rs {ours * 1e3:9.3f} ms   torch {theirs * 1e3:9.3f} ms   x{theirs / ours:6.1f}"
            )
