"""bigtrain: train transformer language models on DeepSpeed."""

import os as _os

__version__ = "0.1.0"

# Registers the `bigtrain_triton` attention with transformers (cheap: Triton loads on first use),
# except in processes that only prepare data (BIGTRAIN_DATA_ONLY=1, set by `bigtrain data prepare`
# for its datatrove workers): they need neither torch nor transformers, ~1 s and ~250 MB each.
if _os.environ.get("BIGTRAIN_DATA_ONLY") != "1":
    from bigtrain import kernels as _kernels  # noqa: E402,F401
