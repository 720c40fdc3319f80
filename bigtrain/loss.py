"""The causal-LM loss without full logits: the vocabulary projection in chunks of tokens.

Memory.  A causal LM's usual loss projects every token onto the vocabulary at once: logits of
B x S x V, upcast to fp32 for the cross entropy, i.e. B*S*V*4 bytes, and the backward holds
about as much again (the log-softmax it saved, the logits' gradient). At a 128k vocabulary and
8k tokens that is 4 GiB per sequence for each of those tensors, more than the whole rest of the
activations of a 1B model. Here the tokens are cut into chunks of C tokens and only one chunk's
logits exist at any time: C*V*4 bytes (C is chosen so that this is 64 MiB, `CHUNK_ELEMENTS`).
What is kept between forward and backward is the final hidden state (B*S*H, already alive for
the model's own backward) and no logits at all.

Backward.  Keeping each chunk's logits for the backward would bring back the full B*S*V, so
each chunk runs under torch.utils.checkpoint (non-reentrant): the forward keeps nothing of the
chunk, the backward recomputes the chunk's logits (one more C x H x V matmul per chunk, about a
third more work for the head; the head is a small part of a step) and differentiates them at
once. The gradients flow through one ordinary autograd graph, so the head's weight gets one
summed gradient per backward, as with full logits: DeepSpeed's loss scaling and gradient
accumulation scaling (engine.backward divides the loss by grad_accum) apply to it like to every
other weight; a tied weight (GPT-2's wte = lm_head) gets its embedding and head gradients in the
same backward; ZeRO's gradient hooks fire once. The head is called as a module (never its
`.weight` directly), so ZeRO-3's module hooks gather its partitioned weight in the forward and
again in the recomputation, as for any activation-checkpointed layer.

Why not DeepSpeed's `TiledFusedLogitsLoss` (deepspeed.runtime.sequence_parallel.ulysses_sp)?
It avoids the recomputation by running each shard's backward inside the forward with a fixed
incoming gradient of 1, and scales only the hidden state's gradient by the real one later: the
head's weight gradient then misses DeepSpeed's 1/grad_accum and fp16 loss scale (wrong at
grad_accum > 1 or in fp16), and is complete before the user's backward starts. transformers
5.x has no chunked loss of its own (only through Liger's Triton kernels, GPU only).

The value.  Exactly transformers' `ForCausalLMLoss`: labels shifted (position t predicts label
t+1), -100 ignored, logits upcast to fp32, the sum over targets divided by the number of
non-ignored targets (or by `num_items_in_batch` when given, as transformers does).

Mixtures of experts.  transformers' MoE causal LMs add the router's load-balancing loss times
`router_aux_loss_coef` to the language-model loss when they return router logits (bigtrain turns
that on); the model computes that term in the same forward (`aux_loss`), so the chunked loss
adds it the same way and the sum is the model's own loss (tests/test_models.py, Mixtral and
Qwen3-MoE).

When (train.chunked_loss).  `auto` turns it on for task=clm and sft when the micro-batch's fp32
logits would reach 256 MiB: micro_batch_size x seq_len x vocab_size >= 2**26 (`AUTO_ELEMENTS`);
`true` always (clm, sft), `false` never. The sequence-parallel path computes its own loss on its
slice and keeps full logits.

The model.  The engine's forward runs with logits_to_keep=1 (transformers' causal LMs then
project only the last position); a forward hook on the decoder (`get_decoder()`, the base
model) keeps its final hidden state, and the head is `get_output_embeddings()` (a peft model
passes both through). Before training, one short forward checks, exactly and whatever the
values, that the head reads that hidden state and that the model returns the head's output
untouched: a model that soft-caps or scales its logits after the head (Gemma 2, Cohere) fails
it, and then auto keeps the model's own loss and true stops with an error.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

IGNORE = -100  # the label transformers' losses skip: not learned (the one definition in bigtrain)
# auto: on from this many fp32 logits per micro-batch (2**26 x 4 bytes = 256 MiB).
AUTO_ELEMENTS = 1 << 26
# Logits per chunk: 2**24 x 4 bytes = 64 MiB in fp32 (e.g. 128 tokens at a 128k vocabulary).
CHUNK_ELEMENTS = 1 << 24
LM_TASKS = ("clm", "sft")


def chunk_tokens_for(vocab_size: int) -> int:
    """Tokens per chunk: a chunk's fp32 logits hold CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def wanted(setting, task: str, micro_batch: int, seq_len: int, vocab_size: int, sequence_parallel: int = 1) -> bool:
    """Whether train.chunked_loss (auto, True, False) asks for the chunked loss in this run."""
    if setting is False or task not in LM_TASKS or sequence_parallel > 1:
        return False
    return setting is True or micro_batch * seq_len * vocab_size >= AUTO_ELEMENTS


def _chunk_sum(head, hidden, targets):
    """Summed cross entropy of one chunk: (n, H) hidden states, (n,) targets."""
    import torch.nn.functional as F

    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")


def chunked_causal_lm_loss(head, hidden, labels, chunk_tokens: int, num_items_in_batch=None):
    """transformers' causal-LM loss of `head(hidden)` against `labels` (B x S, -100 ignored,
    shifted here), with only `chunk_tokens` tokens' logits alive at a time in the forward and
    the backward (module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = zip(flat.split(chunk_tokens), targets.split(chunk_tokens))
    if torch.is_grad_enabled():
        fn = functools.partial(_chunk_sum, head)
        sums = [checkpoint(fn, h, t, use_reentrant=False) for h, t in parts]
    else:
        sums = [_chunk_sum(head, h, t) for h, t in parts]
    total = torch.stack(sums).sum() if len(sums) > 1 else sums[0]
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != IGNORE).sum()


class ChunkedLMLoss:
    """The causal-LM forward of a training run: the model (through the DeepSpeed engine, with
    logits_to_keep=1) computes its hidden states and one position's logits; a forward hook on its
    decoder keeps the final hidden state, from which the loss is computed in chunks."""

    def __init__(self, decoder, head, chunk_tokens: int, router_coef: float = 0.0) -> None:
        self.head, self.chunk_tokens, self.router_coef = head, chunk_tokens, router_coef
        self._last, self._capturing = None, False
        self._hook = decoder.register_forward_hook(self._keep)

    @classmethod
    def for_model(cls, model, vocab_size: int, chunk_tokens: Optional[int] = None) -> "ChunkedLMLoss":
        """For a transformers causal LM (or a peft model around one): its decoder (the base
        model) and output embedding (lm_head, tied or not)."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embedding (lm_head)")
        config = getattr(model, "config", None)
        coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if getattr(config, "output_router_logits", False) else 0.0
        return cls(model.get_decoder(), head, chunk_tokens or chunk_tokens_for(vocab_size), coef)

    def _keep(self, module, args, output) -> None:  # noqa: ARG002 - a forward hook
        if self._capturing:  # only in `hidden` (other forwards, e.g. sft's greedy replies, keep nothing)
            self._last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def close(self) -> None:
        self._hook.remove()
        self._last = None

    def hidden(self, model, batch: dict):
        """The final hidden state (B x S x H, what the head reads) and the model's output (its
        logits of the last position; a mixture of experts' router outputs)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self._last, self._capturing = None, True
        try:
            out = model(**inputs, logits_to_keep=1)
        finally:
            self._capturing = False
        hidden, self._last = self._last, None
        return hidden, out

    def __call__(self, model, batch: dict):
        hidden, out = self.hidden(model, batch)
        loss = chunked_causal_lm_loss(self.head, hidden, batch["labels"], self.chunk_tokens, batch.get("num_items_in_batch"))
        aux = getattr(out, "aux_loss", None)
        if aux is not None and self.router_coef:  # as transformers' MoE models add it to their loss
            loss = loss + self.router_coef * aux.to(loss.device)
        # No full logits exist (evaluation reads only the loss); the router's outputs go on to its monitor.
        return SimpleNamespace(loss=loss, logits=None, aux_loss=aux, router_logits=getattr(out, "router_logits", None))

    def check(self, model, device) -> Optional[str]:
        """None when the model's logits are its head applied to its final hidden state (one short
        forward in eval mode, no gradients, the random state left as it was: a run's dropout
        draws stay those of a run without the check), else why the chunked loss cannot stand in
        for the model's."""
        import torch

        device = torch.device(device)
        gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        training = model.training
        with torch.no_grad(), torch.random.fork_rng(devices=gpus):
            model.train(False)
            try:
                return self._compare(model, torch.tensor([[0, 1, 2, 3]], device=device))
            finally:
                model.train(training)

    def _compare(self, model, ids) -> Optional[str]:
        """Exact, whatever the values: the head reads the hooked hidden state, and the model
        returns the head's output itself (the same memory, unchanged; DeepSpeed's hooks may
        hand on another tensor object over it), where a soft-cap or a scale would make new
        values."""
        import torch

        seen: dict = {}

        def keep_output(module, args, out) -> None:  # noqa: ARG001
            seen["output"], seen["values"] = out, out.detach().clone() if torch.is_tensor(out) else None

        hooks = [self.head.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0] if args else None)),
                 self.head.register_forward_hook(keep_output)]
        try:
            hidden, out = self.hidden(model, {"input_ids": ids})
            logits = out.logits
        except (TypeError, ValueError, AttributeError, IndexError) as e:  # no logits_to_keep, an odd decoder output
            return f"its forward does not take logits_to_keep ({e})"
        finally:
            for h in hooks:
                h.remove()
        if not torch.is_tensor(hidden) or hidden.shape[:2] != ids.shape or not torch.is_tensor(logits) or logits.shape[:2] != (ids.shape[0], 1):
            return "its forward does not give its final hidden state and logits_to_keep=1 logits"
        head_in, head_out, values = seen.get("input"), seen.get("output"), seen.get("values")
        if not torch.is_tensor(head_in) or head_in.shape != hidden[:, -1:].shape or not torch.equal(head_in, hidden[:, -1:]):
            return "its output embedding does not read its decoder's final hidden state"
        if not torch.is_tensor(head_out):
            return "its output embedding does not return a tensor"
        if head_out.dtype == logits.dtype:  # the very memory the head wrote, its values untouched
            same = head_out.data_ptr() == logits.data_ptr() and head_out.shape == logits.shape and torch.equal(values, logits)
        else:  # only upcast (a model that returns fp32 logits)
            same = torch.equal(values.to(logits.dtype), logits)
        if not same:
            return "it changes the output embedding's logits (soft-capped or scaled logits)"
        return None
