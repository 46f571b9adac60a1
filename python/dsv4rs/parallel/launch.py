"""Starting the ranks of a command (``dsv4rs demo --world N``, ``dsv4rs bench --world N``): as
torchrun's process when torchrun started this one, else ``world`` spawned processes joined
through a file store, each reporting its exit status."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable

RankMain = Callable[[int, int, str, argparse.Namespace], int]
"""``(rank, world, init_method, args) -> exit status`` of one rank."""


def _spawned(main: RankMain, rank: int, world: int, init_method: str, args: argparse.Namespace, status: str) -> None:
    code = 1
    try:
        code = main(rank, world, init_method, args)
    except Exception as e:  # noqa: BLE001 - reported, then the rank exits non-zero
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    with open(status, "w", encoding="ascii") as f:
        f.write(str(code))


def launch(main: RankMain, world: int, args: argparse.Namespace, timeout: float, what: str) -> int:
    """Runs ``main`` on every rank and returns 0 when every rank returned 0. Under torchrun
    (``RANK`` and ``WORLD_SIZE`` set) this process is one rank (``env://``); otherwise ``world``
    processes are spawned, and any still running after ``timeout`` seconds is killed."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dsv4rs-world-") as tmp:
        init = f"file://{os.path.join(tmp, 'store')}"
        status = [os.path.join(tmp, f"status{r}") for r in range(world)]
        procs = [ctx.Process(target=_spawned, args=(main, r, world, init, args, status[r])) for r in range(world)]
        print(f"starting {world} processes ({what}) ...", file=sys.stderr, flush=True)
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout)
        codes = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                print(f"rank {r}: did not finish within {timeout:g} s", file=sys.stderr)
            try:
                with open(status[r], encoding="ascii") as f:
                    codes.append(int(f.read()))
            except (OSError, ValueError):
                codes.append(1)
    return 0 if all(c == 0 for c in codes) else 1
