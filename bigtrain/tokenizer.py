"""Tokenizers: train a byte-level BPE with the `tokenizers` library, load a local one.

A trained tokenizer is saved as a transformers `PreTrainedTokenizerFast` directory, so the
exported model directory loads with `AutoTokenizer.from_pretrained(DIR)`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from bigtrain.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Path:
    """Train a byte-level BPE on `texts` and save it (atomically) as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte is in the alphabet, so no input is ever unknown.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tok-", dir=out.parent))
    fast.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(tmp)  # another process won the race; its tokenizer is identical
    else:
        os.replace(tmp, out)
    return out


def load_tokenizer(path: str | os.PathLike, where: str = "data.tokenizer"):
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{where}: tokenizer directory not found: {path} (bigtrain never downloads from a hub)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad directory
        raise UserError(f"{where}: cannot load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tok.eos_token_id is None:
        raise UserError(f"{where}: tokenizer in {path} has no EOS token, which packing needs to separate documents")
    if tok.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padding positions are masked out of the loss.
        tok.pad_token = tok.eos_token
    return tok


def iter_texts(paths: Iterable[Path], errors: str = "strict") -> Iterator[str]:
    for p in paths:
        yield p.read_bytes().decode("utf-8", errors=errors)
