"""Export a checkpoint and print, as JSON, the process's peak RSS before and after (bytes).

The baseline is taken after every import the export needs (torch, DeepSpeed, the model's
transformers module), so the difference is what the export itself holds at its peak.
"""

import json
import resource
import sys

from transformers import AutoConfig

from bigtrain.checkpoint import resolve_checkpoint
from bigtrain.export import _expected_keys, export


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


src, out, shard = sys.argv[1], sys.argv[2], int(sys.argv[3])
import deepspeed.utils.zero_to_fp32  # noqa: E402,F401

_expected_keys(AutoConfig.from_pretrained(str(resolve_checkpoint(src) / "hf")))  # builds a meta model: imports only
before = peak()
export(src, out, max_shard_bytes=shard)
print(json.dumps({"before": before, "after": peak()}))
