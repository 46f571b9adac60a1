"""Per-kernel GPU time of the dsv4rs ops: ``python benches/profile_kernels.py`` (see
:mod:`dsv4rs.bench.profile`)."""

from dsv4rs.bench import profile

if __name__ == "__main__":
    profile.main()
