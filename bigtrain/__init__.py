"""bigtrain: train transformer language models on DeepSpeed."""

__version__ = "0.1.0"

# Registers the `bigtrain_triton` attention with transformers (cheap: Triton loads on first use).
from bigtrain import kernels as _kernels  # noqa: E402,F401
