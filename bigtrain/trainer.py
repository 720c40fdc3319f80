"""The Trainer: every component built in one place from the typed config, then one readable loop.

Components, in the order they are built (`Trainer.__init__`):
  env         rank / local rank / world size (deepspeed, torchrun or srun), gloo on CPU
  ds_config   DeepSpeed JSON: template + bigtrain keys + the user's own config
  data        tokenizer + packed, cached, memory-mapped blocks (rank 0 prepares, others wait)
  model       transformers model from a preset or a local directory
  engine      deepspeed.initialize: ZeRO, precision, AdamW, warmup + cosine LR, clipping
  schedule    which samples each rank sees at each step (seeded, resumable to the sample)
  metrics     metrics.jsonl + TensorBoard on rank 0
The loop (`Trainer.train`) follows one batch: prefetched from the memory-mapped blocks, moved to
the device, forward, backward and step through the DeepSpeed engine, with logging, evaluation and
checkpoints every N steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from bigtrain import checkpoint as ckpt_io
from bigtrain import faults, tasks
from bigtrain.config import LABELED_TASKS, Config, dump_yaml, where_of
from bigtrain.data import BatchSchedule, Prefetcher, TokenBlocks, prepare, split_indices, to_model_batch
from bigtrain.engine import (
    DEEPSPEED_MIN_SCALE_MESSAGE,
    LossScaleWatch,
    build_ds_config,
    dist_env,
    init_distributed,
    initialize,
    release_shm_buffers,
    precision_of,
    setup_accelerator,
)
from bigtrain.errors import UserError
from bigtrain.metrics import MetricsWriter, plot_loss_curve
from bigtrain.models import auto_class, count_parameters, load_pretrained_config, position_limit, preset_config

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")
# Exit code of a run stopped by SIGUSR1/SIGTERM or its time limit after saving a checkpoint
# (EX_TEMPFAIL: "try again"): job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
# Exit code of a run that diverged (fp16 loss scale at its floor, non-finite losses): not worth
# requeueing as is.
DIVERGED_EXIT_CODE = 3
# Exit code of a rank whose peer was lost (killed, crashed, or stuck past the collective timeout).
RANK_LOST_EXIT_CODE = 4


class RankLost(Exception):
    """A collective failed because another rank is gone or stuck."""

    def __init__(self, step: int, lost: Optional[list], cause: BaseException) -> None:
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        who = (f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}") if lost else "rank 0 (its rendezvous store is unreachable)"
        super().__init__(f"lost {who} during step {step}: it stopped answering (the collective failed with: {first})")


class StopSignal:
    """Asks every rank to stop after the current step: on SIGUSR1/SIGTERM, or near a deadline.

    The deadline is `BIGTRAIN_STOP_AT` (Unix seconds; bigtrain's SLURM templates set it from the
    job's end time minus the grace period). Ranks agree through one tiny all-reduce per step, so
    all of them save the same checkpoint even if the signal reached them at different steps.
    """

    def __init__(self) -> None:
        self.reason = ""
        self._signal: Optional[int] = None
        self._stop_at = float(os.environ["BIGTRAIN_STOP_AT"]) if os.environ.get("BIGTRAIN_STOP_AT") else None
        self._last = time.monotonic()
        self._slowest_step = 0.0
        self.watchdog = None  # a stuck rank exits on SIGTERM at once: it could not save anyway

    def install(self) -> None:
        import signal

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.watchdog is not None and self.watchdog.stuck:
            print(f"rank {self.watchdog.rank} is stuck (see the watchdog's stacks): exiting on signal {signum} without a checkpoint",
                  file=sys.stderr, flush=True)
            release_shm_buffers()
            os._exit(RANK_LOST_EXIT_CODE)
        self._signal = signum

    def should_stop(self, device) -> bool:
        import signal

        import torch
        import torch.distributed as dist

        now = time.monotonic()
        self._slowest_step = max(self._slowest_step, now - self._last)
        self._last = now
        local = 0
        if self._signal is not None:
            local = 1
        elif self._stop_at is not None and time.time() + 2 * self._slowest_step + 30 >= self._stop_at:
            local = 2  # two more steps and a checkpoint might not fit before the deadline
        flag = torch.tensor([local], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code == 1:
            name = signal.Signals(self._signal).name if self._signal is not None else "a signal on another rank"
            self.reason = f"received {name}"
        elif code == 2:
            self.reason = "the job's time limit is near"
        return code != 0


def check_output_dir(cfg: Config, overwrite: bool, resume: Optional[str]) -> None:
    """Refuse to write into a directory that holds another run, unless told to."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{where_of(cfg, 'output_dir')}: output_dir {out} exists and is not a directory")
    if out.is_dir():
        held = [m for m in RUN_MARKERS if (out / m).exists()]
        if held and not overwrite and not resume:
            raise UserError(
                f"{where_of(cfg, 'output_dir')}: output_dir {out} holds another run ({', '.join(held)}); "
                "pass --resume auto to continue it or --overwrite to replace it"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".bigtrain-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{where_of(cfg, 'output_dir')}: output_dir {out} is not writable: {e.strerror or e}") from None


def torch_ones_like(t):
    import torch

    return torch.ones_like(t)


def log0(rank: int, *args) -> None:
    if rank == 0:
        print(*args, file=sys.stderr, flush=True)


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, overwrite: bool = False, trust_checkpoint: bool = False) -> None:
        self.cfg = cfg
        self.trust_checkpoint = trust_checkpoint
        self.on_cpu = setup_accelerator()
        import torch

        self.env = dist_env()
        rank = self.env.rank
        self.output_dir = Path(cfg.output_dir)
        if rank == 0:
            check_output_dir(cfg, overwrite, resume)
        self.ds_config = build_ds_config(cfg, self.env.world_size, self.on_cpu)
        self.precision = precision_of(self.ds_config)
        self.global_batch = self.ds_config["train_batch_size"]

        # Checkpoint to resume from (decided before anything is overwritten): the newest one that
        # matches its manifest; damaged ones are skipped, with the reason.
        self.resume_from: Optional[Path] = None
        say = lambda m: log0(rank, m)  # noqa: E731
        if resume == "auto":
            self.resume_from = ckpt_io.latest_checkpoint(self.output_dir / "checkpoints", log=say)
            if self.resume_from is None and ckpt_io.list_checkpoints(self.output_dir / "checkpoints"):
                log0(rank, "--resume auto: no complete checkpoint left: starting from step 0")
        elif resume:
            self.resume_from = ckpt_io.resolve_checkpoint(resume, log=say)

        # A ZeRO checkpoint written at another world size is partitioned for that world size:
        # convert it to DeepSpeed's universal format once (rank 0) and load that.
        self.load_universal = False
        if self.resume_from is not None:
            saved = ckpt_io.read_state(self.resume_from)
            if saved["world_size"] != self.env.world_size and (saved["zero_stage"] >= 1 or saved.get("precision", "fp32") != "fp32"):
                self.load_universal = True
                self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
                if rank == 0:
                    log0(rank, f"world size changed ({saved['world_size']} -> {self.env.world_size}): loading {self.resume_from.name} as a universal checkpoint")
                    ckpt_io.to_universal(self.resume_from)

        # Data: rank 0 checks, tokenizes and packs (cached) before joining the process group, so
        # bad data ends the job before any collective; the other ranks wait in the rendezvous
        # and then load the cache. Labeled files (classify, token_classify) are small: every
        # rank reads and checks them before the rendezvous.
        self.labeled = cfg.task in LABELED_TASKS
        if self.labeled:
            self.prepared = tasks.prepare_labeled(cfg, log=lambda *a: log0(rank, *a))
        elif rank == 0:
            self.prepared = prepare(cfg, log=lambda *a: log0(rank, *a))
        if rank == 0 and overwrite and self.resume_from is None:
            for name in RUN_MARKERS + ("tensorboard", "model", "loss_curve.png", "ds_config.json", "eval_report.txt"):
                p = self.output_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        init_distributed(self.on_cpu, cfg.deepspeed.timeout_minutes)
        if self.on_cpu:
            import atexit

            atexit.register(release_shm_buffers)
        self.device = torch.device("cpu") if self.on_cpu else torch.device("cuda", self.env.local_rank)
        if rank != 0 and not self.labeled:
            self.prepared = prepare(cfg, log=lambda *a: None)
        from bigtrain.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(self.prepared.tokenizer_dir)
        self.masker = tasks.MLMMasker(self.tokenizer, cfg.data.mlm_probability, cfg.data.whole_word_mask, cfg.train.seed) if cfg.task == "mlm" else None
        if self.labeled:
            self.label_names = self.prepared.names
            label2id = {n: i for i, n in enumerate(self.label_names)}
            self.train_set = tasks.tokenize_examples(cfg.task, self.prepared.train, self.tokenizer, label2id, cfg.data.seq_len)
            train_idx, valid_idx = split_indices(len(self.train_set), cfg.data.valid_fraction, cfg.train.seed, bool(self.prepared.valid))
            if self.prepared.valid:
                self.valid_set = tasks.tokenize_examples(cfg.task, self.prepared.valid, self.tokenizer, label2id, cfg.data.seq_len)
                valid_idx = np.arange(len(self.valid_set))
            else:
                self.valid_set = self.train_set
        else:
            self.train_blocks = TokenBlocks(self.prepared.train_path)
            self.valid_blocks = TokenBlocks(self.prepared.valid_path) if self.prepared.valid_path else self.train_blocks
            train_idx, valid_idx = split_indices(len(self.train_blocks), cfg.data.valid_fraction, cfg.train.seed, self.prepared.valid_path is not None)
            if self.prepared.valid_path is not None:
                valid_idx = split_indices(len(self.valid_blocks), 0, 0, True)[0]
        self.valid_indices = valid_idx

        # Model.
        self.hf_config = self._model_config()
        self._check_disk()
        if self.labeled and not hasattr(self.hf_config, "type_vocab_size"):
            # Only BERT-family models take token type ids (a Llama forward would reject them).
            self.train_set.token_type_ids = self.valid_set.token_type_ids = None
        torch.manual_seed(cfg.train.seed)
        self.model = self._build_model()
        self.n_params = count_parameters(self.model)

        # Engine: DeepSpeed owns optimizer, LR schedule, precision, ZeRO and clipping.
        self.engine = initialize(self.model, self.ds_config, cfg.train.weight_decay)
        # fp16: every overflow-skipped step logged with its loss scale; stop when the scale bottoms out.
        self.loss_scale_watch = LossScaleWatch.for_engine(self.engine, self.ds_config) if self.precision == "fp16" else None
        self.diverged: Optional[str] = None

        self.schedule = BatchSchedule(train_idx, self.global_batch, cfg.train.micro_batch_size, self.env.world_size, rank, cfg.train.seed)
        self.step, self.samples_seen = 0, 0
        if self.resume_from is not None:
            state = ckpt_io.load(self.engine, self.resume_from, rank, universal=self.load_universal, trust=self.trust_checkpoint)
            self.step, self.samples_seen = state["step"], state["samples_seen"]
            if state.get("global_batch") != self.global_batch:
                raise UserError(
                    f"--resume: checkpoint {self.resume_from} was trained with global batch {state.get('global_batch')}, "
                    f"this run has {self.global_batch}; keep micro_batch_size x grad_accum x world_size the same"
                )
            log0(rank, f"resumed from {self.resume_from} at step {self.step} ({self.samples_seen} samples seen)")
        # The best evaluation so far (kept and exported for classify/token_classify, or when
        # train.best_metric is set): its checkpoint is never pruned.
        self.best_metric = cfg.train.best_metric or (tasks.default_best_metric(cfg.task) if self.labeled else None)
        self.best = ckpt_io.read_best(self.output_dir / "checkpoints") if self.resume_from is not None else None
        self.best_report: Optional[str] = None
        self.stop = StopSignal()
        self.preempted = False
        self.nonfinite_stop: Optional[str] = None
        # `bigtrain bench train` switches these on: a per-step timer, and no eval/save/stop checks.
        self.timer = None
        self.bench = False
        self.metrics = MetricsWriter(self.output_dir, rank == 0, resume_step=self.step if self.resume_from else None)
        if rank == 0:
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        log0(
            rank,
            f"bigtrain: {cfg.task} {cfg.model.from_pretrained or cfg.model.preset} ({self.n_params / 1e6:.2f}M parameters), "
            f"world size {self.env.world_size}, ZeRO-{cfg.deepspeed.zero_stage}, {self.precision}, "
            f"global batch {self.global_batch} x {cfg.data.seq_len} tokens, {len(train_idx)} training "
            + (f"examples, {len(self.label_names)} labels" if self.labeled else "blocks"),
        )

    # ------------------------------------------------------------------ components

    def _model_config(self):
        cfg = self.cfg
        vocab = len(self.tokenizer)
        if cfg.model.from_pretrained:
            hf = load_pretrained_config(cfg.model.from_pretrained)
            from bigtrain.models import apply_overrides

            apply_overrides(hf, cfg.model.config)
            vocab = max(vocab, getattr(hf, "vocab_size", vocab))  # a larger tokenizer: _build_model resizes the embedding
        else:
            # Round the vocabulary up to a multiple of 64: faster matmuls, same model.
            tok = self.tokenizer
            ids = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, "pad_token_id": tok.pad_token_id}
            hf = preset_config(cfg.model.preset, cfg.model.config, vocab_size=((vocab + 63) // 64) * 64, where=where_of(cfg, "model.preset"), special_ids=ids)
        if hf.vocab_size < vocab:
            raise UserError(f"{where_of(cfg, 'model.config')}: the tokenizer has {vocab} tokens but the model's embedding holds {hf.vocab_size} (model.config.vocab_size)")
        limit = position_limit(hf)
        if limit is not None and cfg.data.seq_len > limit:
            raise UserError(f"{where_of(cfg, 'data.seq_len')}: data.seq_len={cfg.data.seq_len} exceeds the model's {limit} positions")
        if self.labeled:
            hf.num_labels = len(self.label_names)
            hf.id2label = dict(enumerate(self.label_names))
            hf.label2id = {n: i for i, n in enumerate(self.label_names)}
        hf.use_cache = False
        hf.eos_token_id = self.tokenizer.eos_token_id
        hf.bos_token_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        hf.pad_token_id = self.tokenizer.pad_token_id
        return hf

    def _count_parameters_meta(self) -> int:
        import torch

        with torch.device("meta"):
            return sum(p.numel() for p in auto_class(self.cfg.task).from_config(self.hf_config).parameters())

    def _check_disk(self) -> None:
        """Preflight: room for two checkpoints (the newest is written while the previous is kept)."""
        n = self._count_parameters_meta()
        per_ckpt = n * ckpt_io.BYTES_PER_PARAMETER
        free = shutil.disk_usage(self.output_dir).free
        if free < 2 * per_ckpt:
            gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
            raise UserError(
                f"{where_of(self.cfg, 'output_dir')}: not enough free disk for checkpoints in {self.output_dir}: each needs about "
                f"{gb(per_ckpt)} ({n / 1e6:,.1f}M parameters x {ckpt_io.BYTES_PER_PARAMETER} bytes: weights, fp32 master copy, Adam moments) "
                f"and two must fit while one is written; {gb(free)} free"
            )

    @property
    def attn_implementation(self) -> str:
        choice = self.cfg.model.attn_implementation
        if choice == "auto":
            return "sdpa" if self.on_cpu else "bigtrain_triton"
        return choice

    def _use_zero_init(self) -> bool:
        choice = self.cfg.deepspeed.zero3_init
        if choice != "auto":
            return bool(choice)
        return self._count_parameters_meta() > 1_000_000_000

    def _build_model(self):
        attn = self.attn_implementation
        if attn == "bigtrain_triton":
            import bigtrain.kernels  # noqa: F401 - registers the attention function with transformers
        stage3 = self.ds_config["zero_optimization"]["stage"] == 3
        # Import the model's module (and torch._dynamo, which transformers' masking pulls in)
        # before zero.Init patches tensor construction: importing them inside it fails.
        import torch._dynamo  # noqa: F401
        head = auto_class(self.cfg.task)
        head._model_mapping[type(self.hf_config)]
        if stage3 and self._use_zero_init():
            # transformers' ZeRO-3 integration: from_config/from_pretrained create the parameters
            # partitioned (deepspeed.zero.Init) and gather them for weight init and loading.
            # transformers keeps only a weak reference to this object: hold it.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)
        if self.cfg.model.from_pretrained:
            # A new task head (e.g. a classifier on a pretrained encoder or GPT) starts at random;
            # a head of another size (other labels) is replaced.
            model = head.from_pretrained(self.cfg.model.from_pretrained, config=self.hf_config, attn_implementation=attn, ignore_mismatched_sizes=self.labeled)
            if model.get_input_embeddings().weight.shape[0] < len(self.tokenizer):
                model.resize_token_embeddings(len(self.tokenizer))
        else:
            model = head.from_config(self.hf_config, attn_implementation=attn)
        if self.cfg.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    # ------------------------------------------------------------------ the loop

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict):
        return self._forward_outputs(batch).loss

    def _forward_outputs(self, batch: dict):
        segment_ids = batch.pop("segment_ids", None)
        if segment_ids is not None and self.attn_implementation == "bigtrain_triton" and self.cfg.task == "clm":
            # Packed documents: the fused kernel masks attention per document. transformers
            # forwards the keyword to the attention function; an all-ones attention_mask keeps
            # it from inferring packing from position ids (the slow dense path).
            batch["segment_ids"] = segment_ids
            batch.setdefault("attention_mask", torch_ones_like(batch["input_ids"]))
        return self.engine(**batch)

    def make_batch(self, indices, position: int) -> dict:
        """One micro-batch of tensors from sample indices (runs on the prefetch thread)."""
        if self.labeled:
            return self.train_set.batch(indices)
        batch = to_model_batch(self.train_blocks.take(indices), self.tokenizer.pad_token_id)
        if self.masker is not None:
            batch.pop("segment_ids", None)
            batch = self.masker(batch, position * 1_000_003 + int(indices[0]) if len(indices) else position)
        return batch

    def train(self) -> dict:
        import torch
        import torch.distributed as dist

        cfg, t = self.cfg, self.cfg.train
        rank = self.env.rank
        tokens_per_step = self.global_batch * cfg.data.seq_len
        loader = Prefetcher(self.make_batch, self.schedule, self.samples_seen, pin=not self.on_cpu)
        bar = None
        if rank == 0 and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
        pending: list = []  # per-step losses on the device, read back only at log time

        def say(message: str) -> None:  # a log line on rank 0 that leaves the progress bar intact
            if rank == 0:
                (bar.write if bar is not None else print)(message, file=sys.stderr)

        last_log_time, last_log_step = time.perf_counter(), self.step
        self.engine.train()
        self.stop.install()
        from bigtrain.watchdog import StepWatchdog

        watchdog = self.stop.watchdog = StepWatchdog(rank, t.watchdog_factor, t.watchdog_min_seconds).start()
        nan_steps = faults.nan_loss_steps()
        nonfinite_in_row = 0
        last_eval = None
        try:
            timer = self.timer
            while self.step < t.max_steps:
                micro_batches = loader.next()
                if timer is not None:
                    timer.mark("data")
                step_lr = self.engine.optimizer.param_groups[0]["lr"]  # the lr this step uses (no sync)
                step_loss = torch.zeros((), device=self.device)
                this_step = self.step + 1
                watchdog.step_started(this_step)
                faults.at_step_start(this_step, rank)
                nonfinite = None
                try:
                    for i, batch in enumerate(micro_batches):
                        loss = self._forward(self._to_device(batch))
                        if this_step in nan_steps:
                            loss = loss * float("nan")
                        if timer is not None:
                            timer.mark("forward")
                        # Checked before backward, so a bad batch never touches the weights.
                        nonfinite = self._nonfinite_ranks(loss)
                        if nonfinite:
                            if i > 0:  # earlier micro-batches already hold gradients in DeepSpeed
                                self.nonfinite_stop = "with gradient accumulation a step cannot be skipped after its first micro-batch"
                            break
                        self.engine.backward(loss)
                        if timer is not None:
                            timer.mark("backward")
                        self.engine.step()
                        if timer is not None:
                            timer.mark("step")
                        step_loss += loss.detach().float()
                    self.step += 1
                    self.samples_seen += self.global_batch
                    watchdog.step_finished()
                    skipped = self.loss_scale_watch.after_step(self.step) if self.loss_scale_watch is not None else None
                    if not nonfinite and self.precision != "fp16":  # fp16 overflows are DeepSpeed's (skipped above)
                        norm = self.engine.get_global_grad_norm()
                        if norm is not None and not math.isfinite(float(norm)):
                            self.diverged = f"the gradient norm of step {self.step} is {float(norm)} with a finite loss (the weights may be damaged)"
                except Exception as e:  # DeepSpeed's own stop at the loss-scale floor is a bare Exception
                    if DEEPSPEED_MIN_SCALE_MESSAGE not in str(e):
                        raise
                    self.diverged = f"fp16 loss scale is at its minimum and step {this_step} overflowed again (DeepSpeed: {e})"
                    break
                if nonfinite:
                    nonfinite_in_row += 1
                    ids = self.schedule.global_ids(self.samples_seen - self.global_batch)
                    self.metrics.write({"step": self.step, "nonfinite_loss": True, "skipped_step": True, "sample_ids": ids})
                    what = (f"step {self.step}: the loss is non-finite on rank{'s' if len(nonfinite) > 1 else ''} "
                            f"{', '.join(map(str, nonfinite))}; the batch's sample ids: {ids}")
                    if t.on_nonfinite == "stop" or self.nonfinite_stop or nonfinite_in_row >= t.max_nonfinite_steps:
                        why = self.nonfinite_stop or ("train.on_nonfinite=stop" if t.on_nonfinite == "stop" else
                                                      f"{nonfinite_in_row} non-finite steps in a row (train.max_nonfinite_steps={t.max_nonfinite_steps})")
                        # The non-finite steps were never applied: these weights are the last good ones.
                        ckpt = self.save()
                        self.nonfinite_stop = f"{what}; stopping: {why}. Checkpoint {ckpt} holds the weights before it"
                        break
                    say(f"{what}: step skipped ({nonfinite_in_row} in a row; stopping at {t.max_nonfinite_steps})")
                else:
                    nonfinite_in_row = 0
                    pending.append(step_loss / len(micro_batches))
                if bar is not None:
                    bar.update(1)
                if self.bench:
                    timer.end_step()
                    continue
                if skipped is not None:
                    self.metrics.write(skipped)
                    say(f"step {self.step}: fp16 gradients overflowed, step skipped; loss scale {skipped['loss_scale_before']:g} -> {skipped['loss_scale']:g}")
                    if self.loss_scale_watch.floor_step is not None:
                        self.diverged = self.loss_scale_watch.floor_message(self.step)
                if self.diverged:  # stop here, without saving over the last good checkpoint
                    losses = self._reduce_losses(pending)  # keep the losses up to the stop in metrics.jsonl
                    for i, value in enumerate(losses):
                        self.metrics.write({"step": self.step - len(losses) + 1 + i, "loss": value, "lr": step_lr})
                    break
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    # One collective for all steps since the last log: no per-step host sync.
                    losses = self._reduce_losses(pending)
                    now = time.perf_counter()
                    tok_s = tokens_per_step * (self.step - last_log_step) / max(now - last_log_time, 1e-9)
                    lr = step_lr
                    first = self.step - len(losses) + 1
                    for i, value in enumerate(losses):
                        if t.log_every == 1 or i == len(losses) - 1:
                            value = value if t.log_every == 1 else sum(losses) / len(losses)
                            self.metrics.write({"step": first + i, "loss": value, "lr": lr, "tokens_per_s": tok_s, "tokens": self.samples_seen * cfg.data.seq_len})
                    if bar is not None and losses:
                        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
                    pending.clear()
                    last_log_time, last_log_step = now, self.step
                improved = False
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    last_eval = self.evaluate()
                    improved = self._is_best(last_eval)
                if self.step % t.save_every == 0 or self.step == t.max_steps or improved:
                    ckpt = self.save()
                    if improved:
                        self.best = {"tag": ckpt.name, "metric": self.best_metric, "value": last_eval[self.best_metric], "step": self.step,
                                     "eval_loss": last_eval.get("eval_loss")}
                        if rank == 0:
                            ckpt_io.write_best(self.output_dir / "checkpoints", self.best)
                elif self.stop.should_stop(self.device):
                    # Preemption or the job's time limit: finish here with a checkpoint, on all ranks.
                    ckpt = self.save()
                    self.preempted = True
                    log0(rank, f"stopping at step {self.step} ({self.stop.reason}): checkpoint {ckpt}; continue with --resume auto")
                    break
        except RuntimeError as e:
            self._on_collective_failure(e)
            raise
        finally:
            watchdog.close()
            loader.close()
            if bar is not None:
                bar.close()
        return last_eval or {}

    def _nonfinite_ranks(self, loss) -> list[int]:
        """The ranks whose micro-batch loss is NaN or infinite (one small all-reduce, one host sync)."""
        import torch
        import torch.distributed as dist

        bad = ~torch.isfinite(loss.detach().float())
        if self.env.world_size == 1:
            return [0] if bad.item() else []
        flags = torch.zeros(self.env.world_size, device=self.device)
        flags[self.env.rank] = bad.float()
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def _on_collective_failure(self, error: RuntimeError) -> None:
        """If a peer is gone, raise RankLost naming it; otherwise return (the error is our own)."""
        if self.env.world_size == 1:
            return
        from bigtrain.watchdog import lost_ranks

        lost = lost_ranks(self.env.rank, self.env.world_size)
        if lost is None or lost:
            raise RankLost(self.step + 1, lost, error) from error

    def _reduce_losses(self, pending: list) -> list[float]:
        """Mean over ranks of the per-step losses held on the device (one collective)."""
        import torch
        import torch.distributed as dist

        if not pending:
            return []
        losses = torch.stack(pending)
        dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        return (losses / self.env.world_size).tolist()

    @property
    def state(self) -> dict:
        return {
            "step": self.step,
            "task": self.cfg.task,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.samples_seen * self.cfg.data.seq_len,
            "global_batch": self.global_batch,
            "world_size": self.env.world_size,
            "zero_stage": self.ds_config["zero_optimization"]["stage"],
            "precision": self.precision,
            "seed": self.cfg.train.seed,
        }

    def save(self) -> Path:
        return ckpt_io.save(
            self.engine, self.output_dir / "checkpoints", self.state, self.env.rank, self.hf_config, self.tokenizer, self.cfg.train.keep_last
        )

    def _is_best(self, record: dict) -> bool:
        report = record.pop("_report", None)
        if not self.best_metric or self.best_metric not in record:
            return False
        old = self.best["value"] if self.best else None
        tie = old is not None and record[self.best_metric] == old
        # On a tie (accuracy 1.0 twice, say) the lower evaluation loss wins.
        if not (tasks.metric_is_better(self.best_metric, record[self.best_metric], old) or (tie and record.get("eval_loss", math.inf) < self.best.get("eval_loss", math.inf))):
            return False
        self.best_report = report
        return True

    def evaluate(self) -> dict:
        return self._evaluate_labeled() if self.labeled else self._evaluate_lm()

    def _evaluate_lm(self) -> dict:
        """Mean loss over the validation blocks (same number of batches on every rank); for mlm,
        masked with a fixed seed so every evaluation sees the same masks, plus masked accuracy."""
        import torch
        import torch.distributed as dist

        if len(self.valid_indices) == 0:
            return {}
        micro, world, rank = self.cfg.train.micro_batch_size, self.env.world_size, self.env.rank
        n_batches = max(1, min(self.cfg.train.eval_batches, math.ceil(len(self.valid_indices) / (micro * world))))
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x targets, targets, correct
        self.engine.eval()
        with torch.no_grad():
            for b in range(n_batches):
                pos = (b * world + rank) * micro + np.arange(micro)
                idx = self.valid_indices[pos % len(self.valid_indices)]
                batch = to_model_batch(self.valid_blocks.take(idx), self.tokenizer.pad_token_id)
                if self.masker is not None:
                    batch.pop("segment_ids", None)
                    batch = self.masker(batch, -1 - int(pos[0]))  # eval masks: fixed, apart from training's
                batch = self._to_device(batch)
                labels = batch["labels"]
                targets = labels[:, 1:] if self.masker is None else labels
                n_targets = (targets != -100).sum()
                out = self._forward_outputs(batch)
                totals[0] += out.loss.double() * n_targets
                totals[1] += n_targets
                if self.masker is not None:
                    hit = (out.logits.argmax(-1) == labels) & (labels != -100)
                    totals[2] += hit.sum()
        self.engine.train()
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        eval_loss = (totals[0] / totals[1]).item()
        record = {"step": self.step, "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 700))}
        if self.masker is not None:
            record["eval_accuracy"] = (totals[2] / totals[1]).item()
        self.metrics.write(record)
        extra = f", masked-token accuracy {record['eval_accuracy']:.4f}" if "eval_accuracy" in record else ""
        log0(rank, f"step {self.step}: validation loss {eval_loss:.4f}, perplexity {record['eval_ppl']:.2f}{extra}")
        return record

    def _evaluate_labeled(self) -> dict:
        """Every validation example once over all ranks; predictions gathered, scored on each rank."""
        import torch
        import torch.distributed as dist

        if len(self.valid_indices) == 0:
            return {}
        micro, world, rank = self.cfg.train.micro_batch_size, self.env.world_size, self.env.rank
        gold: list = []
        pred: list = []
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.engine.eval()
        with torch.no_grad():
            for chunk in tasks.rank_slices(len(self.valid_indices), micro, world, rank):
                real = chunk >= 0
                idx = self.valid_indices[np.where(real, chunk, 0)]
                batch = self._to_device(self.valid_set.batch(idx))
                out = self._forward_outputs(dict(batch))
                g, p = tasks.predictions(self.cfg.task, out.logits.float(), batch["labels"])
                keep = real.tolist()
                gold += [x for x, k in zip(g, keep) if k]
                pred += [x for x, k in zip(p, keep) if k]
                n = float(real.sum())
                loss_sum[0] += out.loss.double() * n
                loss_sum[1] += n
        self.engine.train()
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (gold, pred))
        gold = [x for g, _ in gathered for x in g]
        pred = [x for _, p in gathered for x in p]
        metrics, report = tasks.score(self.cfg.task, gold, pred, self.label_names)
        record = {"step": self.step, "eval_loss": (loss_sum[0] / loss_sum[1]).item(), **metrics, "eval_examples": len(gold)}
        self.metrics.write(record)
        log0(rank, f"step {self.step}: validation loss {record['eval_loss']:.4f}, accuracy {record['eval_accuracy']:.4f}, f1 {record['eval_f1']:.4f}")
        return {**record, "_report": report}

    def finish(self, sample: bool = True) -> Optional[Path]:
        """Rank 0: export the final model, plot the loss curve, print a sample."""
        import torch.distributed as dist

        self.metrics.close()
        if getattr(self, "_hf_deepspeed_config", None) is not None:
            # Export and sampling build plain models on rank 0 alone: switch transformers'
            # ZeRO-3 mode off, or their construction would wait on collectives.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            self._hf_deepspeed_config = None
            unset_hf_deepspeed_config()
        model_dir = None
        if self.env.rank == 0:
            from bigtrain.export import export

            src = self.output_dir / "checkpoints"
            if self.best is not None and (src / self.best["tag"]).is_dir():
                src = src / self.best["tag"]
                log0(0, f"best {self.best['metric']} {self.best['value']:.4f} at step {self.best['step']}: exporting {src}")
            model_dir = export(src, self.output_dir / "model", overwrite=True)
            if self.best_report:
                (self.output_dir / "eval_report.txt").write_text(self.best_report + "\n")
                log0(0, f"evaluation of the exported model (step {self.best['step']}):\n{self.best_report}")
            png = plot_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png")
            log0(0, f"model: {model_dir}")
            if png:
                log0(0, f"loss curve: {png}")
            if sample and self.cfg.task == "clm" and self.cfg.train.sample_tokens > 0:
                from bigtrain.generate import generate

                text = generate(model_dir, self.cfg.train.sample_prompt, max_new_tokens=self.cfg.train.sample_tokens, temperature=0.8, top_k=40, seed=self.cfg.train.seed)
                log0(0, "sample:\n" + text)
        dist.barrier()
        return model_dir


def run_training(cfg: Config, resume: Optional[str], overwrite: bool, trust_checkpoint: bool = False) -> int:
    return run_trainer(Trainer(cfg, resume=resume, overwrite=overwrite, trust_checkpoint=trust_checkpoint))


def run_trainer(trainer: Trainer) -> int:
    """Train, then export; the exit code says how it ended (0, preempted, diverged)."""
    cfg = trainer.cfg
    if trainer.step >= cfg.train.max_steps:
        log0(trainer.env.rank, f"nothing to do: the checkpoint is at step {trainer.step} >= train.max_steps={cfg.train.max_steps}")
    try:
        result = trainer.train()
    except RankLost as e:
        last = ckpt_io.latest_checkpoint(trainer.output_dir / "checkpoints")
        kept = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        print(f"error: rank {trainer.env.rank}: {e}; {kept}. Restart the job with --resume auto.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The process group is broken: tearing it down could block on the lost peer.
        release_shm_buffers()
        os._exit(RANK_LOST_EXIT_CODE)
    if trainer.preempted:
        return PREEMPTED_EXIT_CODE
    if trainer.nonfinite_stop:
        trainer.metrics.close()
        log0(trainer.env.rank, f"error: training stopped at {trainer.nonfinite_stop}. Inspect those samples, then continue with --resume auto "
             "(the data position is after them) or lower train.lr.")
        return DIVERGED_EXIT_CODE
    if trainer.diverged:
        trainer.metrics.close()
        last = ckpt_io.latest_checkpoint(trainer.output_dir / "checkpoints")
        kept = f"the last good checkpoint is {last} (nothing was saved after it)" if last else "no checkpoint was written before it"
        log0(trainer.env.rank, f"error: training stopped: {trainer.diverged}; {kept}. Try deepspeed.precision=bf16 or a lower train.lr, then --resume auto.")
        return DIVERGED_EXIT_CODE
    if result and "eval_ppl" in result:
        log0(trainer.env.rank, f"final validation loss {result['eval_loss']:.4f}, perplexity {result['eval_ppl']:.2f}")
    trainer.finish()
    return 0
