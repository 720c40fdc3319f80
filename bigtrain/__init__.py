"""bigtrain: train transformer language models on DeepSpeed."""

import os as _os

__version__ = "0.1.0"


class _NoMlflowForDeepSpeedsAutotuner:
    """`import deepspeed` imports mlflow when it is installed, for its autotuner (which bigtrain
    never runs): ~2 s in every rank. This finder makes that one import fail (the autotuner then
    runs without mlflow, as on a machine without it); every other import of mlflow, such as
    bigtrain's MLflow tracker (train.report_to), is untouched."""

    def find_spec(self, name, path=None, target=None):
        import sys

        autotuner = sys.modules.get("deepspeed.autotuning.autotuner")
        if name == "mlflow" and autotuner is not None and not hasattr(autotuner, "has_mlflow"):  # mid-import
            raise ModuleNotFoundError("mlflow is not loaded for DeepSpeed's autotuner (bigtrain/__init__.py)", name=name)
        return None


def _skip_mlflow_in_deepspeed() -> None:
    import sys

    if not any(isinstance(f, _NoMlflowForDeepSpeedsAutotuner) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoMlflowForDeepSpeedsAutotuner())


_skip_mlflow_in_deepspeed()

# Registers the `bigtrain_triton` attention with transformers (cheap: Triton loads on first use),
# except in processes that only prepare data (BIGTRAIN_DATA_ONLY=1, set by `bigtrain data prepare`
# for its datatrove workers): they need neither torch nor transformers, ~1 s and ~250 MB each.
if _os.environ.get("BIGTRAIN_DATA_ONLY") != "1":
    from bigtrain import kernels as _kernels  # noqa: E402,F401
