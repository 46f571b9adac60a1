"""dsv4rs as DeepSeek-V4's attention kernels inside vLLM and SGLang (see README.md).

- :mod:`dsv4rs_plugin.vllm`: ``register``, the ``vllm.general_plugins`` entry point.
- :mod:`dsv4rs_plugin.sglang`: ``register``, the ``sglang.srt.plugins`` entry point.

Neither imports its engine until it is called; ``DSV4RS_PLUGIN`` (``auto``, ``always``,
``off``) picks which calls go to dsv4rs.
"""

__version__ = "0.1.0"
