"""Per-kernel GPU time of the dsv4rs ops: ``python benches/profile_kernels.py``; one decode step of
the model kernel by kernel: ``python benches/profile_kernels.py step [--batch B ...]`` (see
:mod:`dsv4rs.bench.profile`)."""

from dsv4rs.bench import profile

if __name__ == "__main__":
    raise SystemExit(profile.main())
