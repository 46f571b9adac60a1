"""Two builds side by side from the logs of ``dsv4rs bench`` runs (``scripts/gpu_check.sh compare``
writes them): ``python benches/compare.py A=a1.log,a2.log B=b1.log,b2.log``.

Prints, for every case the runs share, each run's time in ms, the median of each build and the
ratio of the second build's median to the first's (below 1: the second is faster). Runs of one
build alternate with the other's on the same machine, since machines differ by up to 10 % from
one lease to the next; compare builds only within such a set of runs."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

# A row of the bench table: the case, then ms, GB/s, TFLOP/s and the roofline fraction.
ROW = re.compile(r"^\s*(?P<case>\S.*?)\s+(?P<ms>\d+\.\d+)\s+\d+\s+\d+\.\d+\s+\d+%")


def rows(text: str) -> dict[str, float]:
    """Case name -> ms of one bench log (progress lines, which end in carriage returns, skipped)."""
    out: dict[str, float] = {}
    for line in text.replace("\r", "\n").splitlines():
        m = ROW.match(line)
        if m:
            out[m["case"]] = float(m["ms"])
    return out


def parse_args(argv: list[str]) -> list[tuple[str, list[Path]]]:
    builds = []
    for arg in argv:
        label, sep, paths = arg.partition("=")
        if not sep or not label or not paths:
            raise SystemExit(f"compare: arguments are LABEL=LOG[,LOG...], got {arg!r}")
        logs = [Path(p) for p in paths.split(",")]
        for log in logs:
            if not log.is_file():
                raise SystemExit(f"compare: {label}: no such log {str(log)!r}")
        builds.append((label, logs))
    if len(builds) != 2:
        raise SystemExit(f"compare: give two builds (LABEL=LOG[,LOG...] twice), got {len(builds)}")
    return builds


def main(argv: list[str]) -> int:
    builds = parse_args(argv)
    runs = [[rows(log.read_text(errors="replace")) for log in logs] for _, logs in builds]
    cases = [c for c in runs[0][0] if all(c in run for build in runs for run in build)]
    if not cases:
        print("compare: the logs share no bench rows", file=sys.stderr)
        return 1
    width = max(len(c) for c in cases)
    heads = [f"{label}{i + 1}" for (label, logs) in builds for i in range(len(logs))]
    heads += [f"{label} median" for label, _ in builds] + [f"{builds[1][0]}/{builds[0][0]}"]
    widths = [max(9, len(h)) for h in heads]
    print(f"{'case':>{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    for case in cases:
        times = [[run[case] for run in build] for build in runs]
        med = [statistics.median(t) for t in times]
        cells = [f"{v:.3f}" for t in times for v in t] + [f"{v:.3f}" for v in med]
        cells.append(f"{med[1] / med[0]:.2f}" if med[0] > 0 else "-")
        print(f"{case:>{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
