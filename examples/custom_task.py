"""A task written only against bigtrain's public API (bigtrain.api): reverse a string of digits.

Each example is `<bos> d1 d2 ... dn = dn ... d2 d1 <eos>`: the model reads the digits and must
write them backwards. Only the reversed half is learned (labels -100 elsewhere), and the
evaluation reports `eval_reverse_accuracy`, the share of reversed digits the model predicts
right (teacher-forced): 0.1 by chance, near 1.0 once it has learned the task. The data is made
from each example's index (the same on every rank, nothing to download); the tokenizer is a
word-level one over the digits and four markers, written into output_dir.

    bigtrain train examples/custom_task.yaml

The config names the class (`task: examples/custom_task.py:ReverseTask`) and its options
(`task_options: {digits: 6}`), checked against `ReverseTask.Options`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bigtrain.api import IGNORE, BaseTask, Evaluation, MixtureSchedule

VALID_OFFSET = 1 << 30  # validation examples come from indices no training example uses


class ReverseTask(BaseTask):
    name = "reverse"
    model_task = "clm"  # a causal LM learns it
    best_metric = "eval_reverse_accuracy"

    @dataclass
    class Options:
        digits: int = 6  # digits per example
        train_examples: int = 100_000
        valid_examples: int = 256

    def __init__(self, cfg, options: "ReverseTask.Options") -> None:
        self.cfg, self.options = cfg, options
        self._tokenizer_dir = Path(cfg.output_dir) / "reverse-tokenizer"

    # -- data ---------------------------------------------------------------------------------

    @property
    def tokenizer_dir(self) -> Path:
        return self._tokenizer_dir

    def prepare(self, rank: int, joined: bool, log) -> None:
        if rank == 0 and not joined:  # rank 0 writes it before the other ranks look for it
            log(f"reverse: {self.options.digits} digits per example, tokenizer in {self._tokenizer_dir}")
            write_tokenizer(self._tokenizer_dir)

    def load(self, tokenizer) -> None:
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "<eos>", "=", *"0123456789")}

    def schedule(self, global_batch, micro_batch, world_size, rank, seed):
        return MixtureSchedule.single(self.options.train_examples, global_batch, micro_batch, world_size, rank, seed)

    def describe(self) -> str:
        return f"reverse {self.options.digits} digits ({self.options.train_examples} training examples)"

    def example(self, index: int) -> tuple[list[int], list[int]]:
        digits = np.random.default_rng(index).integers(0, 10, self.options.digits)
        fwd = [self.ids[str(d)] for d in digits]
        ids = [self.ids["<bos>"], *fwd, self.ids["="], *fwd[::-1], self.ids["<eos>"]]
        prompt = 2 + len(fwd)  # <bos>, the digits and '=' are read, not learned
        return ids, [IGNORE] * prompt + ids[prompt:]

    def batch(self, indices, position: int) -> dict:  # noqa: ARG002 - no randomness per batch
        rows = [self.example(int(i)) for i in indices]
        return {"input_ids": torch.tensor([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows]),
                "attention_mask": torch.ones(len(rows), len(rows[0][0]), dtype=torch.long)}

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, forward, comm) -> Evaluation:
        """Loss and digit accuracy over the validation examples, this rank's share of them."""
        micro, n = self.cfg.train.micro_batch_size, self.options.valid_examples
        totals = torch.zeros(3, dtype=torch.float64, device=comm.device)  # loss x targets, targets, right
        with torch.no_grad():
            for start in range(comm.data_rank * micro, n, micro * comm.data_world):
                batch = comm.to_device(self.batch(VALID_OFFSET + np.arange(start, min(start + micro, n)), 0))
                out = forward(batch)
                targets = batch["labels"][:, 1:]
                learned = targets != IGNORE
                right = (out.logits[:, :-1].argmax(-1) == targets) & learned
                totals += torch.stack([out.loss.double() * learned.sum(), learned.sum().double(), right.sum().double()])
        comm.all_reduce(totals)
        loss, accuracy = (totals[0] / totals[1]).item(), (totals[2] / totals[1]).item()
        return Evaluation({"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700)), "eval_reverse_accuracy": accuracy},
                          f"validation loss {loss:.4f}, reversed digits right {100 * accuracy:.1f}%")


def write_tokenizer(out: Path) -> None:
    """A word-level tokenizer: the ten digits, '=', <bos>, <eos>, <pad> (one token each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "=", *"0123456789"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>").save_pretrained(str(out))
