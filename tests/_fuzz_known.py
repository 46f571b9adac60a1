"""The defect classes tests/test_fuzz.py has found and that are not fixed yet (none now; the
fixed ones keep their reproducers in tests/test_fuzz.py). Each entry needs a reproducer there,
which is a strict xfail while the class is listed; when a fix lands, it fails (XPASS) and the
class comes off this list.
No torch import here: the parent test and the child process both read it."""

from __future__ import annotations

KNOWN_CRASHES: dict[str, tuple[frozenset[str], str]] = {}
"""Crashing defect classes not fixed yet: a case whose tags hold all of a
class's tags is not run in the random batches; tests/test_fuzz.py holds a strict xfail each."""


KNOWN_OUTCOMES: dict[str, str] = {}
"""Defect classes (by outcome) not fixed yet: reported, not failed, in the random batches."""
