"""Tokenizers: train a byte-level BPE (GPT-style) or a WordPiece (BERT-style) with the `tokenizers` library, load a local one.

A trained tokenizer is saved as a transformers `PreTrainedTokenizerFast` directory, so the
exported model directory loads with `AutoTokenizer.from_pretrained(DIR)`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from bigtrain.errors import UserError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


# Tokenizer training sees texts in pieces of at most _PIECE_CHARS characters, cut at whitespace,
# and no run without whitespace longer than _RUN_CHARS. The `tokenizers` trainers hold a whole
# text's pre-tokens in memory at once, and their BPE merge loop is quadratic in the length of one
# pre-token: a 200 KB line of "aaaa..." took a minute, 5 MB did not finish in 5. Only the counts of
# words matter for training, so cutting pathological runs changes no real vocabulary.
_PIECE_CHARS = 1 << 20
_RUN_CHARS = 1000
_LONG_RUN = re.compile(r"(?<!\S)\S{%d}" % _RUN_CHARS)  # a run's start: linear, no re-scan inside runs
_WHOLE_RUN = re.compile(r"(?<!\S)\S{%d,}" % _RUN_CHARS)


def training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """`texts` cut into whitespace-bounded pieces for the tokenizer trainers (see _PIECE_CHARS)."""
    for text in texts:
        if len(text) <= _PIECE_CHARS and not _LONG_RUN.search(text):
            yield text
            continue
        start = 0
        while start < len(text):
            end = min(start + _PIECE_CHARS, len(text))
            if end < len(text):
                cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
                end = cut if cut > start else end
            piece = text[start:end]
            if _LONG_RUN.search(piece):
                piece = _WHOLE_RUN.sub(lambda m: " ".join(m.group(0)[i : i + _RUN_CHARS] for i in range(0, len(m.group(0)), _RUN_CHARS)), piece)
            yield piece
            start = end


def cached_tokenizer(cache: Path, key_parts: list, kind: str, vocab_size: int, texts: Iterable[str], what: str, log) -> Path:
    """The tokenizer a run trains when it is given none (the one place that decides it): a
    byte-level BPE ("bpe" kinds) or a WordPiece ("wordpiece" kinds) of `vocab_size` on `texts`
    (read only when it trains), kept in `cache`/tokenizers under a hash of `key_parts`, which name
    everything it depends on; trained once."""
    import hashlib
    import json

    out = Path(cache) / "tokenizers" / hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:24]
    if not (out / "tokenizer.json").is_file():
        wordpiece = kind.startswith("wordpiece")
        log(f"training a {'WordPiece' if wordpiece else 'byte-level BPE'} tokenizer (vocab {vocab_size}) on {what} ...")
        (train_wordpiece if wordpiece else train_bpe)(texts, vocab_size, out)
    return out


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
    tok.train_from_iterator(training_pieces(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    return _save_atomically(fast, out_dir)


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike, lowercase: bool = True) -> Path:
    """Train a BERT-style WordPiece (the `tokenizers` library's BERT pipeline) and save it atomically.

    Special tokens as in BERT: [PAD]=0, [UNK], [CLS], [SEP], [MASK]; inputs are wrapped as
    `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` with token type ids, as BERT models expect.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(training_pieces(texts), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    return _save_atomically(fast, out_dir)


def _save_atomically(fast, out_dir) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tok-", dir=out.parent))
    fast.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(tmp)  # another process won the race; its tokenizer is identical
    else:
        os.replace(tmp, out)
    return out


def separator_id(tok) -> int:
    """The token that separates packed documents: EOS, or [SEP] for BERT-style tokenizers."""
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def load_tokenizer(path: str | os.PathLike, where: str = "data.tokenizer"):
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        found = p.is_dir()
    except OSError:  # e.g. a name too long
        found = False
    if not found:
        raise UserError(f"{where}: tokenizer directory not found: {path} (bigtrain never downloads from a hub)")
    try:
        # trust_remote_code=False, never None: with None, transformers asks on the terminal whether
        # to run the directory's own tokenizer code (auto_map), and runs it on "y".
        tok = AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad directory
        from bigtrain.models import remote_code_files

        if remote_code_files(p) or "trust_remote_code" in str(e):
            from bigtrain.pretrained import refuse_remote_code

            refuse_remote_code(p, where, e)
        raise UserError(f"{where}: cannot load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tok.eos_token_id is None and tok.sep_token_id is None:
        raise UserError(f"{where}: tokenizer in {path} has neither an EOS nor a [SEP] token, which packing needs to separate documents")
    if tok.pad_token_id is None:
        # GPT-2-style tokenizers have no pad token; padding positions are masked out of the loss.
        tok.pad_token = tok.eos_token
    return tok


def iter_texts(paths: Iterable[Path], errors: str = "strict") -> Iterator[str]:
    for p in paths:
        yield p.read_bytes().decode("utf-8", errors=errors)
