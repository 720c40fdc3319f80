"""Chat fine-tuning data (task=sft): conversations in, token ids with assistant-only labels out.

A conversation is a JSON-lines record with `messages` (a list of {role, content}, roles system /
user / assistant) or `prompt` + `completion` (one user turn, one assistant turn).

Formatting is the tokenizer's own chat template (`apply_chat_template`), as the model will be
prompted later. A tokenizer without one (e.g. one bigtrain trained) gets `DEFAULT_TEMPLATE`
(ChatML) and its two special tokens, added to the tokenizer; the embedding grows to match.

Labels. Only the assistant turns are learned by default (`data.train_on=assistant`; `all` learns
every token). Templates rarely mark where a turn's tokens are, so the spans are found from the
template itself: for assistant turn i, the text rendered for messages[:i] with the generation
prompt ends where the reply starts, and the text rendered for messages[:i+1] ends where it ends
(its end-of-turn token included). Both must be prefixes of the whole conversation's text (true of
every template that renders turns one after another; a template that is not is refused). A token
is learned when its first character lies inside a span (the tokenizer's offset mapping).

Packing (`data.mode=packed`): conversations are laid one after another into sequences of
`data.seq_len` tokens in file order (first fit into the current sequence, else a new one), each
with its own segment id and positions from 0: the attention masks (`bigtrain_triton` reads the
segment ids, SDPA and eager build the block-diagonal mask from the restarting position ids) keep
conversations apart. `data.mode=line_by_line`: one conversation per example, padded per batch.
A conversation longer than seq_len: `data.on_long` = truncate (keep the first seq_len tokens),
skip, or error; the counts are reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from bigtrain.errors import UserError
from bigtrain.loss import IGNORE

ROLES = ("system", "user", "assistant")
# ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n per turn; the generation prompt opens an assistant turn.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # FILE:LINE, for errors


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    where: str


@dataclass
class Packed:
    """Sequences of token ids, labels, segment ids and position ids (rows of equal length)."""

    input_ids: np.ndarray
    labels: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    counts: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def parse_record(record, where: str) -> Conversation:
    """One JSON record -> a checked Conversation, or a `FILE:LINE: ...` UserError."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: a conversation must be a JSON object with 'messages' or 'prompt' and 'completion', got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    else:
        raise UserError(f"{where}: a conversation needs 'messages' or both 'prompt' and 'completion' (keys found: {sorted(record)[:8]})")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: messages[{i}] has an unknown role {m['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: messages[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return Conversation(out, where)


def read_conversations(path: Path, limit: int = 1 << 26) -> list[Conversation]:
    """Every conversation of a JSON-lines file (.jsonl, .gz, .zst), checked, with FILE:LINE."""
    from bigtrain.documents import decode, iter_lines, open_binary

    out = []
    with open_binary(path) as f:
        for lineno, offset, raw in iter_lines(f, path, limit):
            line = decode(raw, path, offset, "error").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e})") from None
            out.append(parse_record(record, f"{path}:{lineno}"))
    if not out:
        raise UserError(f"{path}: no conversations in the file")
    return out


# --------------------------------------------------------------------------- formatting and labels


def ensure_template(tokenizer) -> list[int]:
    """Give a tokenizer without a chat template bigtrain's default (ChatML) and its special
    tokens; returns the ids of the tokens added (the model's embedding must grow), else []."""
    if getattr(tokenizer, "chat_template", None):
        return []
    tokenizer.chat_template = DEFAULT_TEMPLATE
    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": DEFAULT_SPECIAL_TOKENS})
    return list(range(before, len(tokenizer)))


def render(tokenizer, messages: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in templates
        raise UserError(f"{where}: the chat template cannot be applied to this conversation: {type(e).__name__}: {e}") from None


def assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of its assistant replies (end of turn included)."""
    text = render(tokenizer, conv.messages, False, conv.where)
    specials = sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)
    spans = []
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        start = render(tokenizer, conv.messages[:i], True, conv.where) if i else ""
        end = _turn_end(render(tokenizer, conv.messages[: i + 1], False, conv.where), text, specials)
        if not text.startswith(start) or end is None or len(start) > end:
            raise UserError(f"{conv.where}: the chat template does not render turns one after another (the text up to "
                            f"turn {i} is not a prefix of the whole conversation), so the assistant tokens cannot be found")
        spans.append((len(start), end))
    return text, spans


def _turn_end(upto: str, text: str, specials: list[str]) -> Optional[int]:
    """Where the turn that `upto` (the conversation rendered up to it) ends inside `text`: all of
    `upto` when it is a prefix of `text`. Some templates close a conversation with special tokens
    when no generation prompt follows (Phi-3 appends its end-of-text token): such a closing, the
    same at the end of `text`, is no part of the turn. Only a closing made of special tokens is
    taken off, the shortest one, so a character shared by chance with the next turn's opening
    ('<' of '<|user|>') never moves the end."""
    if text.startswith(upto):
        return len(upto)
    common = 0
    for a, b in zip(upto, text):
        if a != b:
            break
        common += 1
    for p in range(common, -1, -1):
        closing = upto[p:]
        if text.endswith(closing) and _special_only(closing, specials):
            return p
    return None


def _special_only(s: str, specials: list[str]) -> bool:
    """s is one or more special tokens (whitespace between them allowed)."""
    s = s.strip()
    if not s:
        return False
    while s:
        token = next((t for t in specials if s.startswith(t)), None)
        if token is None:
            return False
        s = s[len(token):].lstrip()
    return True


def encode(tokenizer, conv: Conversation, train_on: str = "assistant") -> Encoded:
    """Token ids and labels (IGNORE outside the assistant spans unless train_on == "all")."""
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        return Encoded(list(ids), list(ids), conv.where)
    labels = []
    for tok, (a, b) in zip(ids, offsets):
        inside = any(s <= a < e for s, e in spans) if b > a else False
        labels.append(tok if inside else IGNORE)
    return Encoded(list(ids), labels, conv.where)


# --------------------------------------------------------------------------- packing


def fit(examples: Iterable[Encoded], seq_len: int, on_long: str) -> tuple[list[Encoded], dict]:
    """Apply data.on_long; returns the examples that go on and the counts."""
    kept, counts = [], {"conversations": 0, "truncated": 0, "skipped": 0}
    for ex in examples:
        counts["conversations"] += 1
        if len(ex.ids) > seq_len:
            if on_long == "error":
                raise UserError(f"{ex.where}: the conversation has {len(ex.ids)} tokens, more than data.seq_len={seq_len} "
                                "(data.on_long=truncate or skip to go on)")
            if on_long == "skip":
                counts["skipped"] += 1
                continue
            counts["truncated"] += 1
            ex = Encoded(ex.ids[:seq_len], ex.labels[:seq_len], ex.where)
        if all(v == IGNORE for v in ex.labels[1:]):
            counts["skipped"] += 1  # truncated before any reply: nothing left to learn
            continue
        kept.append(ex)
    return kept, counts


def pack(examples: list[Encoded], seq_len: int, pad_id: int) -> Packed:
    """Conversations one after another into rows of seq_len tokens (a new row when the next does
    not fit), segment ids 1, 2, ... per conversation (0 = padding), positions from 0 in each."""
    rows: list[list[Encoded]] = []
    used = seq_len + 1
    for ex in examples:
        if used + len(ex.ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += len(ex.ids)
    n = len(rows)
    out = Packed(np.full((n, seq_len), pad_id, dtype=np.int64), np.full((n, seq_len), IGNORE, dtype=np.int64),
                 np.zeros((n, seq_len), dtype=np.int64), np.zeros((n, seq_len), dtype=np.int64))
    for r, row in enumerate(rows):
        at = 0
        for k, ex in enumerate(row, 1):
            m = len(ex.ids)
            out.input_ids[r, at:at + m] = ex.ids
            out.labels[r, at:at + m] = ex.labels
            out.labels[r, at] = IGNORE  # the first token is never predicted from the previous conversation
            out.segment_ids[r, at:at + m] = k
            out.position_ids[r, at:at + m] = np.arange(m)
            at += m
        out.position_ids[r, at:] = np.arange(seq_len - at)  # padding: its own positions, no loss
    return out


def pad_one_per_row(examples: list[Encoded], seq_len: int, pad_id: int) -> Packed:
    """data.mode=line_by_line: one conversation per row, padded to seq_len (batches trim it)."""
    n = len(examples)
    out = Packed(np.full((n, seq_len), pad_id, dtype=np.int64), np.full((n, seq_len), IGNORE, dtype=np.int64),
                 np.zeros((n, seq_len), dtype=np.int64), np.tile(np.arange(seq_len), (n, 1)))
    for r, ex in enumerate(examples):
        m = len(ex.ids)
        out.input_ids[r, :m], out.labels[r, :m], out.segment_ids[r, :m] = ex.ids, ex.labels, 1
    return out


def describe_counts(counts: dict, on_long: str) -> Optional[str]:
    """The one line that reports long conversations (None when there were none)."""
    if not counts.get("truncated") and not counts.get("skipped"):
        return None
    return (f"{counts['conversations']} conversations: {counts['truncated']} truncated to data.seq_len, "
            f"{counts['skipped']} skipped (data.on_long={on_long}; a conversation cut before its first reply is skipped)")


def exact_match(a: str, b: str) -> bool:
    """Equal after whitespace normalisation (runs of whitespace -> one space, ends stripped)."""
    return " ".join(a.split()) == " ".join(b.split())


def prompt_of(conv: Conversation) -> tuple[list[dict], str]:
    """(the messages before the last assistant turn, that turn's content): what evaluation asks and expects."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    return conv.messages[:last], conv.messages[last]["content"]


def conversations_of(paths: list[str], log: Callable = print) -> list[Conversation]:
    out = []
    for p in paths:
        out += read_conversations(Path(p))
    return out


# --------------------------------------------------------------------------- the task


@dataclass
class ChatData:
    tokenizer_dir: Path
    train: list[Conversation]
    valid: list[Conversation]


def prepare_chat(cfg, log: Callable = print) -> ChatData:
    """Read and check the conversation files and find (or train) the tokenizer. Every rank runs
    it before joining the process group, so bad data ends the job before any collective."""
    import hashlib

    from bigtrain.config import cache_root, where_of
    from bigtrain.data import resolve_tokenizer_dir
    from bigtrain.tokenizer import cached_tokenizer

    d = cfg.data
    if not d.train_files:
        raise UserError(f"{where_of(cfg, 'data.train_files')}: task=sft needs a JSON-lines file of conversations")
    train = conversations_of([str(p) for p in d.train_files])
    valid = conversations_of([str(p) for p in d.valid_files]) if d.valid_files else []
    tok_dir = resolve_tokenizer_dir(cfg)
    if tok_dir is None:
        texts = [m["content"] for c in train for m in c.messages]
        key = [hashlib.sha256("\0".join(texts).encode()).hexdigest(), d.vocab_size, "chat-bpe-v1"]
        tok_dir = cached_tokenizer(cache_root(cfg), key, "chat-bpe-v1", d.vocab_size, texts, "the conversations", log)
    return ChatData(tok_dir, train, valid)


class SFTTask:
    """task=sft: conversations, learned on the assistant turns, packed without cross-talk or one per
    example; evaluated by loss over assistant tokens and by greedy replies (exact match)."""

    labeled = False

    model_task = "clm"  # a causal LM

    def __init__(self, cfg) -> None:
        self.cfg, self.name = cfg, cfg.task
        self.best_metric = cfg.train.best_metric or "eval_loss"
        self.prepared: Optional[ChatData] = None
        self.added_tokens: list[int] = []  # the chat template's tokens added to the tokenizer (load)
        self.segment_ids = False  # packed conversations' ids for bigtrain_triton (use_attention)

    def use_attention(self, attn_implementation: str) -> None:
        self.segment_ids = attn_implementation == "bigtrain_triton"

    @property
    def tokenizer_dir(self) -> Path:
        return self.prepared.tokenizer_dir

    def prepare(self, rank: int, joined: bool, log: Callable) -> None:
        if not joined:
            self.prepared = prepare_chat(self.cfg, log=log if rank == 0 else (lambda *a: None))

    def open(self) -> None:
        pass

    def load(self, tokenizer) -> None:
        from bigtrain.mixture import held_out

        d, p = self.cfg.data, self.prepared
        self.tokenizer = tokenizer
        self.added_tokens = ensure_template(tokenizer)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        train, self.counts = fit((encode(tokenizer, c, d.train_on) for c in p.train), d.seq_len, d.on_long)
        held = set() if p.valid else set(held_out(len(p.train), d.valid_fraction, self.cfg.train.seed).tolist())
        where_held = {p.train[i].where for i in held}
        self.valid_conversations = p.valid or [p.train[i] for i in sorted(held)]
        train = [e for e in train if e.where not in where_held]
        self.train_rows = self._rows(train)
        self.n_train = len(train)
        self.load_validation(tokenizer, self.valid_conversations)

    def _rows(self, examples: list[Encoded]) -> Packed:
        d = self.cfg.data
        return (pack if d.mode == "packed" else pad_one_per_row)(examples, d.seq_len, self.tokenizer.pad_token_id)

    def load_validation(self, tokenizer, conversations: list[Conversation]) -> None:
        """The validation rows and the conversations asked for replies (also `bigtrain eval`'s way in)."""
        self.tokenizer = tokenizer
        self.valid_conversations = conversations
        valid, _ = fit((encode(tokenizer, c, self.cfg.data.train_on) for c in conversations), self.cfg.data.seq_len, "truncate")
        self.valid_rows = self._rows(valid)
        self.valid_indices = np.arange(len(self.valid_rows.input_ids))

    def configure(self, hf_config) -> None:
        # Nothing: transformers separates packed conversations by their restarting position ids
        # when the forward has no attention mask and no cache, and training runs without a cache
        # (models.model_config sets use_cache=False for every task; generation turns it on).
        pass

    def describe(self) -> str:
        rows = self.train_rows
        learned = int((rows.labels != IGNORE).sum())
        shape = "sequences" if self.cfg.data.mode == "packed" else "padded examples"
        line = describe_counts(self.counts, self.cfg.data.on_long)
        return (f"{self.n_train} conversations in {len(rows.input_ids)} {shape}, {learned:,} learned tokens "
                f"(data.train_on={self.cfg.data.train_on})" + (f"; {line}" if line else ""))

    def schedule(self, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        from bigtrain.mixture import MixtureSchedule

        # Conversations are held out before they become rows (load): every row trains.
        return MixtureSchedule.single(len(self.train_rows.input_ids), global_batch, micro_batch, world_size, rank, seed)

    def progress(self, position: int) -> dict:  # noqa: ARG002
        return {}

    def _batch(self, rows: Packed, indices) -> dict:
        import torch

        idx = np.asarray(indices)
        seg = rows.segment_ids[idx]
        width = int((seg > 0).sum(axis=1).max()) if self.cfg.data.mode != "packed" else seg.shape[1]
        out = {"input_ids": torch.from_numpy(rows.input_ids[idx, :width]), "labels": torch.from_numpy(rows.labels[idx, :width]),
               "position_ids": torch.from_numpy(rows.position_ids[idx, :width])}
        if self.cfg.data.mode != "packed":
            out["attention_mask"] = torch.from_numpy((seg[:, :width] > 0).astype(np.int64))
            return out
        if self.segment_ids:
            out["segment_ids"] = torch.from_numpy(seg)
            out["attention_mask"] = torch.ones_like(out["input_ids"])
        return out  # SDPA / eager: the restarting position ids give the block-diagonal mask

    def batch(self, indices, position: int) -> dict:  # noqa: ARG002 - no per-batch randomness
        return self._batch(self.train_rows, indices)

    def evaluate(self, forward: Callable, comm) -> "object":
        import torch

        from bigtrain.evaluation import Evaluation, rank_slices

        if len(self.valid_indices) == 0:  # data.valid_fraction=0 and no valid_files
            return Evaluation({})
        micro = self.cfg.train.micro_batch_size
        totals = torch.zeros(4, dtype=torch.float64, device=comm.device)  # loss x targets, targets, exact, asked
        with torch.no_grad():
            for chunk in rank_slices(len(self.valid_indices), micro, comm.data_world, comm.data_rank):
                real = chunk >= 0
                batch = comm.to_device(self._batch(self.valid_rows, self.valid_indices[np.where(real, chunk, 0)]))
                batch["labels"][torch.from_numpy(~real).to(comm.device)] = IGNORE
                n = (batch["labels"][:, 1:] != IGNORE).sum()
                out = forward(batch)
                totals[0] += out.loss.double() * n
                totals[1] += n
            self._exact_match(forward, comm, totals)
        comm.all_reduce(totals)
        loss = (totals[0] / totals[1].clamp(min=1)).item()
        record = {"eval_loss": loss}
        line = f"validation loss {loss:.4f} (assistant tokens)"
        if totals[3] > 0:
            record["eval_exact_match"] = (totals[2] / totals[3]).item()
            record["eval_generated"] = int(totals[3].item())
            line += f", exact match {record['eval_exact_match']:.3f} of {record['eval_generated']} replies"
        return Evaluation(record, line)

    def _exact_match(self, forward: Callable, comm, totals) -> None:
        """Greedy replies to up to eval.generate_examples validation prompts, this rank's share.
        Every rank runs the same number of forwards (ZeRO-3 gathers parameters in each)."""

        convs = self.valid_conversations[: self.cfg.eval.generate_examples]
        mine = [c for i, c in enumerate(convs) if i % comm.data_world == comm.data_rank]
        turns = -(-len(convs) // comm.data_world)
        stop = stop_ids(self.tokenizer)
        for k in range(turns):
            conv = mine[k] if k < len(mine) else None
            messages, want = prompt_of(conv) if conv is not None else ([{"role": "user", "content": ""}], "")
            ids = self.tokenizer(render(self.tokenizer, messages, True, "eval"), add_special_tokens=False)["input_ids"]
            reply = greedy(forward, ids, stop, self.cfg.eval.max_new_tokens, comm.device)
            if conv is not None:
                totals[2] += float(exact_match(self.tokenizer.decode(reply, skip_special_tokens=True), want))
                totals[3] += 1


def stop_ids(tokenizer) -> set:
    """Tokens that end a reply: the end-of-sequence token and the templates' end-of-turn tokens."""
    out = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<end_of_turn>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None:
            out.add(i)
    return out


def greedy(forward: Callable, prompt: list[int], stop: set, max_new: int, device) -> list[int]:
    """Greedy decoding by full forwards (no cache: works through the DeepSpeed engine at any
    ZeRO stage); always `max_new` forwards, so every rank runs as many."""
    import torch

    ids, reply, done = list(prompt), [], False
    for _ in range(max_new):
        x = torch.tensor([ids], device=device)
        logits = forward({"input_ids": x}).logits
        nxt = int(logits[0, -1].argmax())
        if not done:
            if nxt in stop:
                done = True
            else:
                reply.append(nxt)
                ids.append(nxt)
    return reply


# --------------------------------------------------------------------------- bigtrain chat


def chat_loop(model_dir: str, system: Optional[str], max_new_tokens: int, stdin, stdout) -> int:
    """`bigtrain chat MODEL_DIR`: each line of input is a user turn; the reply is streamed as it
    is generated (greedy), the conversation kept. On a terminal it prompts; otherwise it reads
    stdin line by line and prints one reply per line, so it can be scripted."""
    import torch
    from transformers import AutoModelForCausalLM

    from bigtrain.models import load_pretrained_config
    from bigtrain.tokenizer import load_tokenizer

    p = Path(model_dir)
    if not (p / "config.json").is_file():
        raise UserError(f"chat: {model_dir} is not a model directory (no config.json); export one with 'bigtrain export'")
    if max_new_tokens < 1:
        raise UserError(f"chat: --max-new-tokens must be >= 1, got {max_new_tokens}")
    tok = load_tokenizer(str(p), where="chat")
    if not getattr(tok, "chat_template", None):
        raise UserError(f"chat: the tokenizer in {model_dir} has no chat template; fine-tune with task=sft first")
    model = AutoModelForCausalLM.from_pretrained(str(p), config=load_pretrained_config(str(p), where="chat"), trust_remote_code=False).eval()
    stop = sorted(stop_ids(tok))
    history = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok(render(tok, history, True, "chat"), add_special_tokens=False, return_tensors="pt").input_ids
        streamer = _LineStreamer(tok, stdout, "model> " if interactive else "")
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=tok.pad_token_id or stop[0], streamer=streamer)
        reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})


class _LineStreamer:
    """Writes the reply's text as tokens arrive (transformers' streamer protocol: put, end)."""

    def __init__(self, tok, stdout, prefix: str) -> None:
        self.tok, self.out, self.prefix = tok, stdout, prefix
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            self.out.write(self.prefix)
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True).replace("\n", " ")
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()
