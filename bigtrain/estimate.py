"""`bigtrain estimate`: GPU and CPU memory a training job needs, per GPU and per node.

Everything here is arithmetic on a transformers config: the model is built on the meta device
(no memory allocated) only to count its parameters exactly. Four parts, per GPU:

* parameters, gradients and optimizer states (the "model states"), split by ZeRO stage and
  offload exactly the way DeepSpeed's own estimators split them
  (`deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs` and
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`), see `model_states`;
* activations for one micro-batch, see `activation_bytes`.

And per node: the CPU memory that offload (and loading the model) needs, with DeepSpeed's own
formulas and its default 1.5x buffer factor.

The estimate is for the optimizer bigtrain uses (Adam/AdamW: two fp32 states per parameter)
and ignores the CUDA context (~0.5-1 GiB per GPU), communication buckets and allocator
fragmentation: leave ~10-20% headroom.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from bigtrain.errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOADS = ("none", "cpu", "nvme")
# DeepSpeed's estimators multiply CPU memory by this (their default additional_buffer_factor).
BUFFER_FACTOR = 1.5
# DeepSpeed's ZeRO-3 defaults that size the NVMe swap buffers (offload_param.buffer_count,
# offload_param.buffer_size, sub_group_size).
_PARAM_SWAP_BUFFERS = 5 * 100_000_000 * 2
_SUB_GROUP_SIZE = 1_000_000_000


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    model_type: str  # "gpt2" or "llama" (llama-style: RMSNorm, rotary, SwiGLU, GQA)
    params: int  # unique parameters (tied embeddings counted once)
    largest_layer_params: int  # most parameters held directly by one module (DeepSpeed's definition)
    layers: int
    hidden: int
    heads: int
    kv_dim: int  # key/value width: kv_heads * head_dim (== hidden without GQA)
    intermediate: int  # MLP width
    vocab: int
    positions: int | None
    dropout: bool  # residual/embedding dropout active in training
    gelu_new: bool  # GPT-2's tanh GeLU written in Python ops (saves 4 tensors, not 1)
    linear_params: int = 0  # in nn.Linear layers (lm_head included): what AutoTP splits
    q_dim: int = 0  # query width: heads * head_dim (0: == hidden)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3, OLMo-2 style)
    # Mixtures of experts (0 for dense models): routed experts per MoE layer, experts per token,
    # one expert's MLP width, MoE layers, and the routed experts' parameters (all layers; what
    # expert parallelism splits) and one layer's.
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    moe_layers: int = 0
    expert_params: int = 0
    expert_layer_params: int = 0
    dense_largest_layer_params: int = 0  # the largest module outside the routed experts

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: all but the unchosen share of the routed experts."""
        if not self.experts:
            return self.params
        return self.params - self.expert_params * (self.experts - self.top_k) // self.experts


def model_shape(cfg) -> ModelShape:
    """Count parameters on the meta device and read the shape from a transformers config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    encoder = cfg.model_type in ("bert", "roberta")
    with torch.device("meta"):
        model = (AutoModelForMaskedLM if encoder else AutoModelForCausalLM).from_config(cfg)
    params = sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linear = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters(recurse=False))
    mt = cfg.model_type
    if mt == "gpt2":
        h, heads = cfg.n_embd, cfg.n_head
        return ModelShape(
            model_type="gpt2", params=params, largest_layer_params=largest, layers=cfg.n_layer,
            hidden=h, heads=heads, kv_dim=h, intermediate=cfg.n_inner or 4 * h, vocab=cfg.vocab_size,
            positions=cfg.n_positions, dropout=max(cfg.resid_pdrop, cfg.embd_pdrop) > 0,
            gelu_new=cfg.activation_function == "gelu_new", linear_params=linear,
        )
    if encoder:
        # BERT/RoBERTa: the GPT-2 layer (LayerNorms, exact GeLU MLP, dropout), post-norm.
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        return ModelShape(
            model_type="gpt2", params=params, largest_layer_params=largest, layers=cfg.num_hidden_layers,
            hidden=h, heads=heads, kv_dim=h, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
            positions=cfg.max_position_embeddings, dropout=max(cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) > 0,
            gelu_new=False, linear_params=linear,
        )
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return ModelShape(
        model_type="llama", params=params, largest_layer_params=largest, layers=cfg.num_hidden_layers,
        hidden=h, heads=heads, kv_dim=kv_heads * head_dim, intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size, positions=getattr(cfg, "max_position_embeddings", None),
        dropout=False, gelu_new=False, linear_params=linear, q_dim=heads * head_dim,
        qk_norm=any(n.endswith("q_norm") for n, _ in model.named_modules()), **_experts_shape(cfg, model),
    )


def _experts_shape(cfg, model) -> dict:
    """The MoE fields of ModelShape (none for a dense model), counted on the meta model: the
    routed experts are transformers' `*.experts` modules (one per MoE layer)."""
    from bigtrain.moe import experts_per_token, num_experts

    experts = num_experts(cfg)
    if experts is None:
        return {}
    blocks = {n: m for n, m in model.named_modules() if n.endswith(".experts")}
    sizes = [sum(p.numel() for p in m.parameters()) for m in blocks.values()]
    dense = max(sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()
                if not any(n == b or n.startswith(b + ".") for b in blocks))
    width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return dict(experts=experts, top_k=experts_per_token(cfg), expert_intermediate=width, moe_layers=len(blocks),
                expert_params=sum(sizes), expert_layer_params=max(sizes), dense_largest_layer_params=dense)


def preset_shape(name: str) -> ModelShape:
    from bigtrain.models import preset_config

    return model_shape(preset_config(name, {}, None, where="--preset"))


# --------------------------------------------------------------------------- model states


@dataclass
class ModelStates:
    params: int
    grads: int
    optimizer: int
    cpu_per_node: int
    nvme_per_node: int = 0


def model_states(n: int, largest_layer: int, zero: int, offload: str, nodes: int, gpus_per_node: int,
                 precision: str = "bf16") -> ModelStates:
    """Bytes per GPU for parameters, gradients and Adam states, and CPU bytes per node.

    Mixed precision (bf16/fp16) follows DeepSpeed: 16-bit working parameters and gradients,
    fp32 master weights (4 bytes), Adam momentum and variance (4 + 4), and an fp32 copy of the
    gradient partition (4) for the step. Per GPU, with N parameters, G GPUs in all, L the largest
    layer's parameters:

    ======  ==========================  ===========================  ===============  ==============
    ZeRO    parameters                  gradients                    optimizer        total
    ======  ==========================  ===========================  ===============  ==============
    0       2N                          2N + 4N (fp32 grads)         12N              20N
    1       2N                          2N + 4N/G                    12N/G            4N + 16N/G
    2       2N                          (2 + 4)N/G                   12N/G            2N + 18N/G
    3       2N/G + 2L (gathered layer)  4N/G + 2L                    12N/G            4L + 18N/G
    ======  ==========================  ===========================  ===============  ==============

    ZeRO-2 and ZeRO-3 totals are exactly `estimate_zero2_model_states_mem_needs` and
    `estimate_zero3_model_states_mem_needs` (DeepSpeed counts 18 bytes per parameter under
    ZeRO-3, whose fp32 gradient copy is built one optimizer sub-group at a time; we book the 4 of
    its gradient share as 2 for the 16-bit shard and 2 for that copy). ZeRO-0 at any G and
    ZeRO-1 at G = 1 equal ZeRO-2 at G = 1 (20N: DeepSpeed's bf16/fp16 optimizers keep the fp32
    master and an fp32 gradient buffer even without ZeRO).

    fp32: the working copy is the fp32 one (4 bytes). Without ZeRO the torch optimizer runs
    as is: 4N + 4N + 8N = 16N. With ZeRO >= 1 DeepSpeed still clones its fp32 master partition
    (12N/G optimizer), the gradient shard is already fp32 (4N/G, no extra copy).

    Offload (`cpu`, or `nvme`): optimizer states (fp32 master, Adam, fp32 gradients) leave the
    GPU; under ZeRO-3 the parameters go too, leaving only the gathered largest layer (4L, as
    DeepSpeed counts it). ZeRO-1/2 have no NVMe path: DeepSpeed keeps their offloaded states in
    CPU memory for either device. CPU per node (x1.5 buffer factor, as DeepSpeed):
    no offload: each local rank materializes the fp32 model once while loading: 4N per GPU
    (ZeRO-3 builds it partitioned under zero.Init: 4L per GPU). ZeRO-1/2 offload:
    N * max(4G, 16). ZeRO-3 offload: 18N / nodes. ZeRO-3 NVMe: the fp32 gradient partitions
    (4N / nodes) plus DeepSpeed's default swap buffers per GPU stay in CPU memory; 14N / nodes
    (16-bit parameters + master + Adam) go to NVMe.
    """
    _check_states_args(zero, offload, precision, nodes, gpus_per_node)
    mixed = precision != "fp32"
    w = 2 if mixed else 4  # bytes of the working (compute) copy of a parameter / gradient
    if offload == "none":
        return _states_on_gpu(n, largest_layer, zero, nodes * gpus_per_node, gpus_per_node, w, mixed)
    return _states_offloaded(n, largest_layer, zero, offload, nodes, gpus_per_node, w, mixed)


def _check_states_args(zero: int, offload: str, precision: str, nodes: int, gpus_per_node: int) -> None:
    """Refuse a ZeRO stage, offload, precision or node layout that `model_states` cannot estimate."""
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if offload not in OFFLOADS:
        raise UserError(f"--offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if offload != "none" and zero == 0:
        raise UserError(f"--offload {offload} needs --zero 1, 2 or 3: DeepSpeed offloads only ZeRO-partitioned states")
    if nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {gpus_per_node}")


def _states_on_gpu(n: int, ll: int, zero: int, g: int, gpus_per_node: int, w: int, mixed: bool) -> ModelStates:
    """`model_states` without offload: the ZeRO table of its docstring (g = GPUs in all, ll = largest layer)."""
    cpu = int((ll if zero == 3 else n) * 4 * gpus_per_node * BUFFER_FACTOR)
    if zero == 0:
        return ModelStates(w * n, (w + 4) * n if mixed else 4 * n, 12 * n if mixed else 8 * n, cpu)
    if zero == 1:
        return ModelStates(w * n, w * n + (int(4 * n / g) if mixed else 0), int(12 * n / g), cpu)
    if zero == 2:
        grads = int((w + 4) * n / g) if mixed else int(4 * n / g)
        total = int((w + 16) * n / g) if mixed else int(16 * n / g)
        return ModelStates(w * n, grads, total - grads, cpu)
    # ZeRO-3: DeepSpeed's int(18 N / G) + 4 L, split as `model_states` documents.
    p, gr = int(w * n / g) + w * ll, int(4 * n / g) + w * ll
    total = (int(18 * n / g) + 4 * ll) if mixed else (int(20 * n / g) + 8 * ll)
    return ModelStates(p, gr, total - p - gr, cpu)


def _states_offloaded(n: int, ll: int, zero: int, offload: str, nodes: int, gpus_per_node: int, w: int,
                      mixed: bool) -> ModelStates:
    """`model_states` with offload to cpu or nvme (ll = largest layer)."""
    g = nodes * gpus_per_node
    f = BUFFER_FACTOR
    if zero in (1, 2):
        cpu = int(n * max(4 * g, 16) * f)
        grads = w * n if zero == 1 else 0  # ZeRO-1 keeps the whole 16-bit gradient on the GPU
        return ModelStates(w * n, grads, 0, cpu)
    # ZeRO-3: parameters and optimizer both offloaded; only the gathered largest layer stays.
    half = 2 * ll if mixed else 4 * ll
    if offload == "cpu":
        return ModelStates(half, half, 0, int(n * (16 + w) * (1 / nodes) * f))
    per_rank_swap = _PARAM_SWAP_BUFFERS + 16 * min(math.ceil(n / g), _SUB_GROUP_SIZE)
    cpu = int(4 * n / nodes * f) + gpus_per_node * per_rank_swap
    return ModelStates(half, half, 0, cpu, nvme_per_node=int((w + 12) * n / nodes))


# --------------------------------------------------------------------------- activations


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, precision: str = "bf16",
                     checkpointing: bool = False, device: str = "cuda", tp: int = 1) -> dict[str, int]:
    """Peak activation bytes of one micro-batch on one GPU (forward + backward).

    Counts what autograd really saves in the transformers GPT-2 and Llama code (checked against
    `torch.autograd.graph.saved_tensors_hooks` in the tests), per token, with e = bytes of an
    activation (2 for bf16/fp16, 4 for fp32), h = hidden, I = MLP width, a = heads, k = key/value
    width, V = vocabulary, m = bytes of a dropout mask (1: CUDA saves bool masks):

    * GPT-2 layer: ``e*(8h + 5I) + 2m*h + 4a + 16``. LayerNorm inputs (2h) and their mean/rstd
      (16), c_attn input (h), q/k/v as views of c_attn's output (3h), the attention output (h,
      also c_proj's input: FlashAttention returns it in (b, s, heads, d) layout, so no copy) and
      its fp32 log-sum-exp (4a), c_fc input (h), GPT-2's `gelu_new` written in Python ops (4
      tensors of I), c_proj input (I), two residual dropout masks.
      This is Korthikanti et al. 2022 (34sbh + 5as^2b per layer) adapted: no s^2 term, since
      attention is FlashAttention-style (bigtrain_triton or torch SDPA's flash / memory-efficient
      kernels on GPU, dropout regenerated from the RNG seed, never stored as a mask); the
      unfused tanh-GeLU costs 4 tensors where Megatron's fused one costs 1.
    * Llama layer: ``8h + e*(6h + 2k + 4I) + 4a``. HF's RMSNorm upcasts its input to fp32 and
      saves it (4h, twice per layer), plus the normalized and the weighted output (2e*h, twice);
      q (h) and k, v (2k: grouped-query attention keeps them narrow) after rotary, the attention
      output (h, shared with o_proj's input) and log-sum-exp (4a); SwiGLU saves gate, silu(gate),
      up and the product (4I).
    * Outside the layers: token ids and labels (16), the final norm and lm_head input (GPT-2:
      ``2e*h + 8 + m*h`` with the embedding dropout mask; Llama: ``4h + 2e*h``), and the logits:
      transformers upcasts them to fp32 for the loss, cross-entropy saves its fp32 log-softmax,
      and the backward's first step holds that, its incoming gradient and its result at once:
      ``12V`` per token, the peak, reached while every layer's activations are still alive.

    Without checkpointing the peak is ``L * layer + outside + 12V``. With activation
    checkpointing (transformers' gradient_checkpointing, one checkpoint per decoder layer) each
    layer keeps only its input (``e*h``) and the backward recomputes one layer at a time, after
    the logits' peak is over: ``L*e*h + outside + max(layer, 12V)``.

    Tensor parallelism (Llama, `tp` ranks): q, k, v, the attention output, its log-sum-exp and
    the SwiGLU tensors are split by heads or by MLP width (``e*(2h + 2k + 4I)/tp + 4a/tp``); the
    norms' inputs and outputs (``8h + 4e*h``) are whole on every rank, and so are the logits
    (AutoTP gathers lm_head's output). Sequence parallelism needs no term of its own: a rank
    holds seq_len/sp tokens everywhere but inside the core attention, where it holds the whole
    sequence for 1/sp of the heads, the same bytes (`estimate` passes seq_len/sp).

    `device="cpu"` describes what the tests can measure on CPU: dropout masks are full tensors
    of the activation dtype (m = e), and torch's CPU flash kernel copies GPT-2's strided q and v
    (+2e*h per layer). On CPU, SDPA with dropout falls back to the math kernel, which stores the
    s^2 scores: not modelled (the tests disable dropout there).
    """
    if seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {seq_len}")
    if micro_batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {micro_batch}")
    e = 4 if precision == "fp32" else 2
    layer, outside = _per_token_bytes(shape, e, device, tp)
    tokens = seq_len * micro_batch
    logits = 12 * shape.vocab
    if checkpointing:
        layers = shape.layers * e * shape.hidden + layer
        # The logits' peak is over before the backward recomputes the first layer.
        peak = shape.layers * e * shape.hidden + max(layer, logits)
    else:
        layers = shape.layers * layer
        peak = layers + logits
    return {"one_layer": tokens * layer, "layers": tokens * layers, "outside_layers": tokens * outside,
            "logits": tokens * logits, "total": tokens * (peak + outside)}


def _per_token_bytes(shape: ModelShape, e: int, device: str, tp: int = 1) -> tuple[int, int]:
    """(one layer, outside the layers) activation bytes per token, as `activation_bytes` documents them."""
    h, inter, a, k = shape.hidden, shape.intermediate, shape.heads, shape.kv_dim
    m = (1 if device == "cuda" else e) if shape.dropout else 0
    if shape.model_type == "gpt2":
        act = 4 if shape.gelu_new else 1
        layer = e * (8 * h + (act + 1) * inter) + 2 * m * h + 4 * a + 16
        if device == "cpu":
            layer += 2 * e * h
        outside = 16 + 2 * e * h + 8 + m * h
    else:
        q = shape.q_dim or h
        per_head = e * (2 * q + 2 * k) + ((4 + e) * (q + k) if shape.qk_norm else 0)  # split by tensor parallelism
        attention = 8 * h + 4 * e * h + math.ceil(per_head / tp) + math.ceil(4 * a / tp)
        dense = attention + math.ceil(e * 4 * inter / tp)
        layer = dense
        if shape.moe_layers:
            x, f = shape.top_k, shape.expert_intermediate
            moe = attention + x * e * (2 * h + 4 * f) + 4 * shape.experts + 46 * x
            layer = math.ceil((shape.moe_layers * moe + (shape.layers - shape.moe_layers) * dense) / shape.layers)
        outside = 16 + 4 * h + 2 * e * h
    return layer, outside


# --------------------------------------------------------------------------- the estimate


def tensor_parallel_share(shape: ModelShape, tp: int) -> tuple[int, int]:
    """(parameters, largest layer) on each of `tp` tensor-parallel ranks: AutoTP splits every
    linear layer (lm_head included) `tp` ways; embeddings and norms stay whole on every rank."""
    if tp == 1:
        return shape.params, shape.largest_layer_params
    if shape.model_type != "llama":
        raise UserError("--tp: DeepSpeed's AutoTP splits Llama-family models (GPT-2's Conv1D layers are refused); use --preset llama-*")
    n = shape.params - shape.linear_params + math.ceil(shape.linear_params / tp)
    return n, max(shape.vocab * shape.hidden, math.ceil(shape.largest_layer_params / tp))


def expert_parallel_states(shape: ModelShape, ep: int, zero: int, nodes: int, gpus_per_node: int, precision: str) -> tuple[ModelStates, int]:
    """Model states per GPU with the routed experts split over `ep` ranks (DeepSpeed AutoEP), and
    the parameters each GPU holds before ZeRO. Two parts: every weight but the experts, data
    parallel over all G GPUs (ZeRO partitions it G ways), and the GPU's 1/ep of the experts, data
    parallel over the G/ep ranks holding the same experts (ZeRO partitions it G/ep ways). Under
    ZeRO-3 one layer is gathered at a time: the larger of the dense model's largest and one MoE
    layer's local experts. CPU per node: every rank builds the whole model before AutoEP splits it."""
    g = nodes * gpus_per_node
    dense_n, local = shape.params - shape.expert_params, shape.expert_params // ep
    gathered = max(shape.dense_largest_layer_params, shape.expert_layer_params // ep)
    a = model_states(dense_n, gathered, zero, "none", nodes, gpus_per_node, precision)
    b = model_states(local, 0, zero, "none", 1, g // ep, precision)
    full = model_states(shape.params, shape.largest_layer_params, zero, "none", nodes, gpus_per_node, precision)
    return ModelStates(a.params + b.params, a.grads + b.grads, a.optimizer + b.optimizer, full.cpu_per_node), dense_n + local


def _check_experts(shape: ModelShape, ep: int, tp: int, sp: int, offload: str, gpus: int) -> None:
    if ep < 1:
        raise UserError(f"--ep must be >= 1, got {ep}")
    if ep == 1:
        return
    if not shape.experts:
        raise UserError(f"--ep {ep}: the model is dense (no experts to split); use a mixture of experts such as --preset mixtral-8x7b")
    if shape.experts % ep:
        raise UserError(f"--ep {ep} does not divide the model's {shape.experts} experts")
    if gpus % ep:
        raise UserError(f"--ep {ep} does not divide the {gpus} GPUs")
    if tp > 1 or sp > 1:
        raise UserError(f"--ep with --{'tp' if tp > 1 else 'sp'}: bigtrain trains mixtures of experts with expert and data parallelism only")
    if offload != "none":
        raise UserError(f"--ep with --offload {offload}: not modelled (expert and dense states offload in groups of different sizes)")


def _check_layout(tp: int, sp: int, nodes: int, gpus_per_node: int, seq_len: int) -> None:
    for flag, n in (("--tp", tp), ("--sp", sp)):
        if n < 1:
            raise UserError(f"{flag} must be >= 1, got {n}")
    if tp > 1 and sp > 1:
        raise UserError("--tp and --sp together: DeepSpeed does not combine AutoTP with Ulysses; choose one")
    if tp > 1 and gpus_per_node % tp:
        raise UserError(f"--tp {tp} does not divide --gpus-per-node {gpus_per_node}: tensor parallelism needs its ranks inside one node")
    if (nodes * gpus_per_node) % (tp * sp):
        raise UserError(f"--sp {sp} does not divide the {nodes * gpus_per_node} GPUs")
    if seq_len % sp:
        raise UserError(f"--seq-len {seq_len} does not divide by --sp {sp}")


def estimate(shape: ModelShape, zero: int = 0, offload: str = "none", nodes: int = 1, gpus_per_node: int = 1,
             seq_len: int = 1024, micro_batch: int = 1, checkpointing: bool = False, precision: str = "bf16",
             device: str = "cuda", tp: int = 1, sp: int = 1, ep: int = 1) -> dict[str, Any]:
    """Per-GPU and per-node memory. Tensor parallelism: each GPU holds its `tensor_parallel_share`
    and ZeRO partitions over the GPUs / tp data-parallel ranks. Sequence parallelism: the
    parameters are whole on every rank of a group and ZeRO partitions over all GPUs (DeepSpeed's
    Ulysses reduces over sequence and data ranks together); activations are seq_len/sp tokens.
    Expert parallelism: `expert_parallel_states`; activations as without it (a rank computes,
    with balanced routing, as many routed tokens as its own tokens choose experts)."""
    if shape.positions and seq_len > shape.positions:
        raise UserError(f"--seq-len {seq_len} is longer than the model's {shape.positions} positions")
    _check_layout(tp, sp, nodes, gpus_per_node, seq_len)
    _check_experts(shape, ep, tp, sp, offload, nodes * gpus_per_node)
    if ep > 1:
        ms, n = expert_parallel_states(shape, ep, zero, nodes, gpus_per_node, precision)
    else:
        n, largest = tensor_parallel_share(shape, tp)
        ms = model_states(n, largest, zero, offload, nodes, gpus_per_node // tp, precision)
        ms.cpu_per_node, ms.nvme_per_node = ms.cpu_per_node * tp, ms.nvme_per_node * tp  # tp such groups per node
    act = activation_bytes(shape, seq_len // sp, micro_batch, precision, checkpointing, device, tp)
    per_gpu = {"params": ms.params, "grads": ms.grads, "optimizer": ms.optimizer, "activations": act["total"]}
    per_gpu["total"] = sum(per_gpu.values())
    return {
        "params": shape.params,
        "active_params": shape.active_params,
        "largest_layer_params": shape.largest_layer_params,
        "zero": zero, "offload": offload, "precision": precision, "tensor_parallel": tp, "sequence_parallel": sp,
        "expert_parallel": ep,
        "params_per_gpu_before_zero": n,
        "nodes": nodes, "gpus_per_node": gpus_per_node,
        "seq_len": seq_len, "micro_batch": micro_batch, "activation_checkpointing": checkpointing,
        "per_gpu_bytes": per_gpu,
        "activation_bytes": act,
        "per_node_cpu_bytes": ms.cpu_per_node,
        "per_node_nvme_bytes": ms.nvme_per_node,
        "model": asdict(shape),
    }


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bigtrain.models import PRESETS

    parser.add_argument("--preset", required=True, help=f"model preset: {', '.join(PRESETS)}")
    parser.add_argument("--zero", type=int, default=0, metavar="S", help="ZeRO stage 0-3 (default 0)")
    parser.add_argument("--offload", default="none", metavar="none|cpu|nvme",
                        help="offload optimizer states (ZeRO>=1) and, under ZeRO-3, parameters (default none)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=1, metavar="G", help="GPUs per node (default 1)")
    parser.add_argument("--seq-len", type=int, default=None, metavar="L", help="tokens per sequence (default 1024, or the model's positions if fewer)")
    parser.add_argument("--micro-batch", type=int, default=1, metavar="B", help="sequences per GPU per step (default 1)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in the backward")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (DeepSpeed AutoTP; Llama-family models)")
    parser.add_argument("--sp", type=int, default=1, metavar="N", help="sequence-parallel ranks (DeepSpeed Ulysses)")
    parser.add_argument("--ep", type=int, default=1, metavar="N", help="expert-parallel ranks (DeepSpeed AutoEP; mixtures of experts)")
    parser.add_argument("--precision", default="bf16", metavar="P", help="fp32, fp16 or bf16 (default bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def _act_parts(r: dict[str, Any]) -> str:
    act = r["activation_bytes"]
    if r["activation_checkpointing"]:
        inputs = act["layers"] - act["one_layer"]
        return (f"layer inputs {inputs / 2**30:.2f} + max(one recomputed layer {act['one_layer'] / 2**30:.2f}, "
                f"logits {act['logits'] / 2**30:.2f})")
    return f"layers {act['layers'] / 2**30:.2f}, logits {act['logits'] / 2**30:.2f}"


def _layout(r: dict[str, Any]) -> str:
    gpus = r["nodes"] * r["gpus_per_node"]
    if r["tensor_parallel"] > 1:
        return f" (data parallel {gpus // r['tensor_parallel']} x tensor parallel {r['tensor_parallel']})"
    if r["expert_parallel"] > 1:
        ep, experts = r["expert_parallel"], r["model"]["experts"]
        return f" (expert parallel {ep}: {experts // ep} of {experts} experts per GPU)"
    if r["sequence_parallel"] > 1:
        return f" (data parallel {gpus // r['sequence_parallel']} x sequence parallel {r['sequence_parallel']}: {r['seq_len'] // r['sequence_parallel']} tokens per GPU)"
    return ""


def format_report(name: str, r: dict[str, Any]) -> str:
    g = r["per_gpu_bytes"]
    gpus = r["nodes"] * r["gpus_per_node"]
    m = r["model"]
    moe = f", {r['active_params']:,} active per token ({m['experts']} experts, top-{m['top_k']})" if m["experts"] else ""
    lines = [
        f"model: {name}, {r['params']:,} parameters{moe} (largest layer {r['largest_layer_params']:,})",
        f"setup: ZeRO-{r['zero']}, offload {r['offload']}, {r['precision']}, {r['nodes']} node(s) x "
        f"{r['gpus_per_node']} GPU(s) = {gpus}{_layout(r)}, micro-batch {r['micro_batch']} x {r['seq_len']} tokens, "
        f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}",
        "per GPU:",
        f"  parameters   {_gib(g['params'])}",
        f"  gradients    {_gib(g['grads'])}",
        f"  optimizer    {_gib(g['optimizer'])}",
        f"  activations  {_gib(g['activations'])}  ({_act_parts(r)})",
        f"  total        {_gib(g['total'])}",
        f"per node CPU:  {_gib(r['per_node_cpu_bytes'])}",
    ]
    if r["per_node_nvme_bytes"]:
        lines.append(f"per node NVMe: {_gib(r['per_node_nvme_bytes'])}")
    if r["offload"] == "nvme" and r["zero"] < 3:
        lines.append("note: ZeRO-1/2 have no NVMe path; DeepSpeed keeps the offloaded states in CPU memory")
    lines.append("(add ~1 GiB per GPU for the CUDA context and buffers, and 10-20% for fragmentation)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from bigtrain.models import PRESETS

    if args.preset not in PRESETS:
        import difflib

        close = difflib.get_close_matches(args.preset, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"--preset: unknown preset '{args.preset}'{hint}; presets: {', '.join(PRESETS)}")
    # Check every flag before building the model, so a typo costs nothing.
    model_states(1, 1, args.zero, args.offload, args.nodes, args.gpus_per_node, args.precision)
    if args.seq_len is not None and args.seq_len < 1:
        raise UserError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.micro_batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {args.micro_batch}")
    shape = preset_shape(args.preset)
    if args.seq_len is None:
        args.seq_len = min(1024, shape.positions or 1024)
    r = estimate(shape, zero=args.zero, offload=args.offload, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                 seq_len=args.seq_len, micro_batch=args.micro_batch, checkpointing=args.activation_checkpointing,
                 precision=args.precision, tp=args.tp, sp=args.sp, ep=args.ep)
    if args.json:
        print(json.dumps({"preset": args.preset, **r}))
    else:
        print(format_report(args.preset, r))
    return 0
