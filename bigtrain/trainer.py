"""The Trainer: every component built in one place from the typed config, then one readable loop.

Components, in the order they are built (`Trainer.__init__`):
  env           rank / local rank / world size (deepspeed, torchrun, srun or --nproc), gloo on CPU
  ds_config     DeepSpeed JSON: template + bigtrain keys + the user's own config (engine.py)
  checkpointer  which checkpoint to resume from, saving, the best one, pruning (checkpointer.py)
  task          the data and everything else that differs per task: batches, labels, evaluation (tasks.py)
  model         transformers model from a preset or a local directory (models.py)
  engine        deepspeed.initialize: ZeRO, precision, AdamW, warmup + cosine LR, clipping
  lm_loss       train.chunked_loss: the causal-LM loss in chunks of tokens, no full logits (loss.py)
  schedule      which samples each rank sees at each step (seeded, resumable to the sample)
  runner        one optimizer step: micro-batches through forward, backward, step (steps.py)
  profiler      train.profile: torch.profiler traces of a window of steps (profiling.py)
  guard         non-finite steps, the fp16 loss scale: go on, skip or stop (steps.py)
  log           log lines, metrics.jsonl, the trackers of train.report_to, the progress bar (metrics.py, trackers.py)
  meter         step time, tokens/s, MFU, data wait and memory at each log (metrics.py, flops.py)
  stop          preemption and time limits, agreed by all ranks (preemption.py)

The loop (`Trainer.train`) follows one batch: prefetched from the memory-mapped blocks, moved to
the device, forward, backward and step through the DeepSpeed engine (`train_step`); then, only on
steps that log, evaluate, save or stop, the step results are read back from the device and acted
on (`after_step`). A quiet step reads nothing from the device.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bigtrain import faults
from bigtrain.checkpoint import BYTES_PER_PARAMETER, CheckpointWriteError, check_pickles, read_state, to_universal
from bigtrain.checkpointer import Checkpointer
from bigtrain.config import LABELED_TASKS, Config, check_batch, dump_yaml, where_of
from bigtrain.plugins import is_reference
from bigtrain.process import dist_env, init_distributed, release_shm_buffers, setup_accelerator
from bigtrain.data import Prefetcher
from bigtrain.engine import LossScaleWatch, build_ds_config, compile_engine, compile_summary, initialize, precision_of
from bigtrain.errors import UserError
from bigtrain.flops import device_peak_flops, flops_per_token
from bigtrain.lora import count_trainable, lora_settings
from bigtrain.export import adapt_universal
from bigtrain.moe import RouterMonitor, active_parameters, experts_per_token, num_experts
from bigtrain.loss import ChunkedLMLoss, wanted as chunked_loss_wanted
from bigtrain.metrics import RunLog, StepMeter, plot_loss_curve, setup_logging
from bigtrain.mixture import DATA_ORDER
from bigtrain.models import build_model, choose_attention, count_parameters, count_parameters_meta, model_config
from bigtrain.parallel import SequenceShard, check_model, describe_saved_layout, layout_of, register_sequence_parallel
from bigtrain.profiling import StepProfiler
from bigtrain.preemption import RANK_LOST_EXIT_CODE, StopSignal
from bigtrain.runlock import RunLock
from bigtrain.api import Callback, TrainState
from bigtrain.steps import DivergedError, HealthGuard, StepResult, StepRunner
from bigtrain.tasks import Comm, Evaluation, build_task
from bigtrain.trackers import RUN_IDS, Trackers
from bigtrain.watchdog import RankLost, StepWatchdog, raise_if_rank_lost

__all__ = ["Trainer", "Outcome", "Callback", "TrainState", "run_training", "run_trainer", "check_output_dir", "RANK_LOST_EXIT_CODE"]

RUN_MARKERS = ("config.yaml", "checkpoints", "metrics.jsonl")
# What else a run writes into output_dir (--overwrite removes it all).
OTHER_OUTPUTS = ("tensorboard", "model", "loss_curve.png", "ds_config.json", "eval_report.txt", "profile", "wandb", "mlruns",
                 RUN_IDS, "report.html")
# Exit code of a run stopped by SIGUSR1/SIGTERM or its time limit after saving a checkpoint
# (EX_TEMPFAIL: "try again"): job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
# Exit code of a run that diverged (fp16 loss scale at its floor, non-finite losses): not worth
# requeueing as is.
DIVERGED_EXIT_CODE = 3
# A checkpoint could not be written (a full disk): the run ends, the last good checkpoint kept.
SAVE_FAILED_EXIT_CODE = 5


@dataclass
class Outcome:
    """How `Trainer.train` ended."""

    status: str  # "completed", "preempted", "diverged", "save_failed" (a checkpoint could not be written) or "stopped" (by a callback)
    message: str = ""  # for diverged and save_failed: the whole error sentence
    last_eval: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return {"preempted": PREEMPTED_EXIT_CODE, "diverged": DIVERGED_EXIT_CODE, "save_failed": SAVE_FAILED_EXIT_CODE}.get(self.status, 0)


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


def check_disk(cfg: Config, output_dir: Path, n_params: int) -> None:
    """Preflight: room for two checkpoints (the newest is written while the previous is kept)."""
    per_ckpt = n_params * BYTES_PER_PARAMETER
    free = shutil.disk_usage(output_dir).free
    if free < 2 * per_ckpt:
        gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
        raise UserError(
            f"{where_of(cfg, 'output_dir')}: not enough free disk for checkpoints in {output_dir}: each needs about "
            f"{gb(per_ckpt)} ({n_params / 1e6:,.1f}M parameters x {BYTES_PER_PARAMETER} bytes: weights, fp32 master copy, Adam moments) "
            f"and two must fit while one is written; {gb(free)} free"
        )


class Trainer:
    def __init__(self, cfg: Config, resume: Optional[str] = None, overwrite: bool = False, trust_checkpoint: bool = False,
                 callbacks: Optional[list[Callback]] = None) -> None:
        self.cfg, self.callbacks = cfg, list(callbacks or []) + user_callbacks(cfg)
        self.run_lock: Optional[RunLock] = None  # rank 0: this run owns output_dir
        self.on_cpu = setup_accelerator()
        self.env = dist_env()
        self.layout = layout_of(cfg, self.env.world_size, self.env.rank)
        self.logger = setup_logging(self.env.rank)
        self.output_dir = Path(cfg.output_dir)
        self.ds_config = build_ds_config(cfg, self.env.world_size, self.on_cpu)
        self.precision = precision_of(self.ds_config)
        self.global_batch = check_batch(cfg, self.env.world_size, lambda k: where_of(cfg, k))
        self.task = build_task(cfg)
        self._choose_attention()  # before anything is written: a failed explicit choice stops here
        self.checkpointer = Checkpointer(self.output_dir, self.env.rank, cfg.train.keep_last, self.task.best_metric)
        try:
            self._before_group(resume, overwrite, trust_checkpoint)
            self._join_group()
            self._build_model()
        except BaseException:
            # Bad data or a bad model found after the output directory was locked: give it back
            # (a process that goes on, such as a test or a notebook, must not keep holding it).
            if self.run_lock is not None:
                self.run_lock.release()
            raise
        mpu, self._unregister_sequence_parallel = register_sequence_parallel(self.model, self.attn, cfg)
        self.engine = initialize(self.model, self.ds_config, cfg.train.weight_decay, mpu)
        self.checkpointer.write_in_background(self.engine, cfg.train.async_save)
        self.shard = SequenceShard(self.layout, cfg.deepspeed.zero_stage) if self.layout.sp > 1 else None
        self.lm_loss = self._lm_loss()
        if cfg.train.compile:  # after the chunked-loss check's forward, so that runs eager and compiles nothing
            compile_engine(self.engine)
            self.logger.info("train.compile: the model is compiled with torch.compile (inductor, DeepSpeed's engine.compile()); "
                             "the first step and the first evaluation wait for the compilation")
        # Ranks of one tensor- or sequence-parallel group hold the same samples: the schedule is
        # keyed by the data-parallel rank (bigtrain/parallel.py).
        self.schedule = self.task.schedule(self.global_batch, cfg.train.micro_batch_size, self.layout.dp, self.layout.dp_rank, cfg.train.seed)
        self.run_state = TrainState(0, 0, cfg.train.max_steps, self.output_dir, self.env.rank, self.env.world_size)
        if self.checkpointer.resume_from is not None:
            self._restore(trust_checkpoint)
        self.profiler = self._profiler()
        self.runner = StepRunner(self.engine, self.device, self.callbacks, named_ranges=self.profiler is not None)
        watch = LossScaleWatch.for_engine(self.engine, self.ds_config) if self.precision == "fp16" else None
        self.guard = HealthGuard(self.env.world_size, cfg.train.on_nonfinite, cfg.train.max_nonfinite_steps,
                                 self.schedule.global_ids, watch, counts=self.run_state)
        self.log = RunLog(self.output_dir, self.env.rank, resume_step=self.step if self.checkpointer.resume_from else None,
                          trackers=self._trackers(resume) if self.env.rank == 0 else None)
        if self.attn_fallback:
            self.log.record({"step": self.step, "attn_fallback": self.attn_fallback, "attn_implementation": self.attn})
        self.meter = self._meter()
        self.stop = StopSignal(self.env.world_size, self.on_cpu)
        self.comm = Comm(self.env.rank, self.env.world_size, self.device, data=(self.layout.dp_rank, self.layout.dp))
        if self.env.rank == 0:
            (self.output_dir / "config.yaml").write_text(dump_yaml(cfg))
            (self.output_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        self.logger.info(
            f"bigtrain: {self.task.name} {cfg.model.from_pretrained or cfg.model.preset} ({self._parameters_text()}), "
            f"{self.layout.describe()}{self._experts_text()}, ZeRO-{cfg.deepspeed.zero_stage}, {self.precision}, "
            f"global batch {self.global_batch} x {cfg.data.seq_len} tokens, {self.task.describe()}"
        )

    # ------------------------------------------------------------------ building

    def _parameters_text(self) -> str:
        if self.lora is None:
            active = f", {self.n_active / 1e6:.2f}M active per token" if self.n_active != self.n_params else ""
            return f"{self.n_params / 1e6:.2f}M parameters{active}"
        trainable, total = count_trainable(self.model)
        return (f"LoRA r={self.lora['r']}: {trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters "
                f"({100 * trainable / max(total, 1):.2f}%)")

    def _experts_text(self) -> str:
        if self.router is None:
            return ""
        ep = self.cfg.deepspeed.expert_parallel
        # layout.describe() has just said "expert parallel N"
        split = f" ({self.router.experts // ep} of {self.router.experts} experts per rank)" if ep > 1 else ""
        return f"{split}, top-{self.router.top_k} routing"

    def _lm_loss(self) -> Optional[ChunkedLMLoss]:
        """train.chunked_loss: the causal-LM loss in chunks of tokens (bigtrain/loss.py), checked
        against the model's own logits by one short forward; None: the model's own loss."""
        cfg, setting = self.cfg, self.cfg.train.chunked_loss
        vocab = self.hf_config.vocab_size
        if not chunked_loss_wanted(setting, self.task.model_task, cfg.train.micro_batch_size, cfg.data.seq_len, vocab, self.layout.sp):
            return None
        try:
            lm_loss = ChunkedLMLoss.for_model(self.engine.module, vocab)
            why = lm_loss.check(self.engine, self.device)
            if why is not None:
                lm_loss.close()
        except (ValueError, AttributeError, NotImplementedError) as e:  # no lm_head or no decoder to hook
            lm_loss, why = None, str(e)
        if why is not None:
            model = type(self.engine.module).__name__
            if setting is True:
                if self.run_lock is not None:
                    self.run_lock.release()
                raise UserError(f"{where_of(cfg, 'train.chunked_loss')}: train.chunked_loss=true, but {model} cannot use the chunked loss: {why}")
            self.logger.info(f"causal-LM loss: full logits (train.chunked_loss=auto, but {model}: {why})")
            return None
        tokens, chunk = cfg.train.micro_batch_size * cfg.data.seq_len, lm_loss.chunk_tokens
        mib = lambda n: f"{n * vocab * 4 / 2**20:,.1f} MiB"  # noqa: E731 - the fp32 logits of n tokens
        what = (f"{mib(chunk)} of fp32 logits at a time instead of {mib(tokens)}" if chunk < tokens
                else f"one chunk holds a micro-batch's {mib(tokens)} of fp32 logits")
        self.logger.info(f"causal-LM loss: chunked (train.chunked_loss={str(setting).lower()}), {chunk} tokens per chunk: {what}")
        return lm_loss

    def _profiler(self) -> Optional[StepProfiler]:
        p = self.cfg.train.profile
        if not p.start:
            return None
        profiler = StepProfiler(p.start, p.steps, self.step + 1, self.output_dir, self.env.rank, not self.on_cpu, self.logger.info)
        self.callbacks.append(profiler)
        return profiler

    def _meter(self) -> StepMeter:
        """Step time, tokens/s, MFU, data wait and memory at each log (rank 0 measures the peak)."""
        fpt = flops_per_token(self.n_active, self.hf_config, self.cfg.data.seq_len)
        peak = None
        if self.env.rank == 0:
            try:
                # On CPU a 512x512 matmul: a rough peak, measured in milliseconds.
                peak, _ = device_peak_flops(not self.on_cpu, self.cfg.train.peak_tflops, "train.peak_tflops", n=512)
            except UserError as e:
                self.logger.info(f"MFU is not logged: {e}")
        return StepMeter(self.global_batch * self.cfg.data.seq_len, self.env.world_size, not self.on_cpu, fpt, peak)

    def _trackers(self, resume: Optional[str]) -> Trackers:
        """Rank 0: train.report_to's trackers, given the resolved configuration as parameters; a
        run started with --resume continues the trackers' runs of output_dir/trackers.json."""
        params = {"bigtrain": self.cfg.to_dict(), "deepspeed": self.ds_config}
        return Trackers(self.cfg.train.report_to, self.output_dir, params, self.cfg, resume is not None, self.logger.warning)

    def _before_group(self, resume: Optional[str], overwrite: bool, trust: bool = False) -> None:
        """Rank 0 checks the output directory and chooses the checkpoint (before anything is
        overwritten); data that every rank must check is read before any collective."""
        if self.env.rank == 0:
            check_output_dir(self.cfg, overwrite, resume)
            # Before choosing a checkpoint: another run on this directory could be pruning it.
            self.run_lock = RunLock.acquire(self.output_dir, self.cfg.train.lock_stale_seconds, self.logger.info)
            chosen = self.checkpointer.choose(resume, log=self.logger.info)
            if chosen is not None and self._needs_universal(chosen):
                if not trust:
                    check_pickles(chosen)  # the conversion unpickles the checkpoint's files
                saved = read_state(chosen)
                self.logger.info(f"layout changed ({describe_saved_layout(saved)} -> {self.layout.describe()}): "
                                 f"loading {chosen.name} as a universal checkpoint")
                adapt_universal(to_universal(chosen), chosen, saved.get("expert_parallel", 1), self.cfg.deepspeed.expert_parallel)
        self.task.prepare(self.env.rank, False, self.logger.info)
        if self.env.rank == 0 and overwrite and self.checkpointer.resume_from is None:
            for name in RUN_MARKERS + OTHER_OUTPUTS:
                p = self.output_dir / name
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def _choose_attention(self) -> None:
        """The attention the run uses (bigtrain_triton only once its self-check passed here) and
        whether the task hands the model its documents' segment ids (the fused kernel's packing)."""
        cfg = self.cfg
        self.attn, self.attn_fallback = choose_attention(cfg, self.on_cpu, self.precision, self.env.local_rank, self.logger.warning)
        self.task.use_attention(self.attn)

    def _needs_universal(self, ckpt: Path) -> bool:
        """A ZeRO checkpoint written in another layout (world size, tensor, sequence or expert
        parallelism) is partitioned for that layout: it is converted to DeepSpeed's universal
        format once (rank 0) and loaded as such. A change of expert parallelism always goes
        through it: AutoEP's parameters are not transformers' (bigtrain/export.py adapt_universal)."""
        saved = read_state(ckpt)
        if saved.get("expert_parallel", 1) != self.cfg.deepspeed.expert_parallel:
            return True
        layout = (saved["world_size"], saved.get("tensor_parallel", 1), saved.get("sequence_parallel", 1))
        changed = layout != (self.env.world_size, self.layout.tp, self.layout.sp)
        return changed and (saved["zero_stage"] >= 1 or saved.get("precision", "fp32") != "fp32")

    def _join_group(self) -> None:
        import torch

        init_distributed(self.on_cpu, self.cfg.deepspeed.timeout_minutes)
        if self.on_cpu:
            import atexit

            atexit.register(release_shm_buffers)
        self.device = torch.device("cpu") if self.on_cpu else torch.device("cuda", self.env.local_rank)
        ckpt = self.checkpointer.share_choice()
        self.load_universal = ckpt is not None and self._needs_universal(ckpt)
        if self.load_universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.task.prepare(self.env.rank, True, self.logger.info)
        from bigtrain.tokenizer import load_tokenizer

        self.task.open()
        self.tokenizer = load_tokenizer(self.task.tokenizer_dir)
        self.task.load(self.tokenizer)
        self.downstream = self._downstream()

    def _build_model(self) -> None:
        import torch

        self.hf_config = model_config(self.cfg, self.tokenizer, self.task)
        check_disk(self.cfg, self.output_dir, count_parameters_meta(self.task.model_task, self.hf_config))
        torch.manual_seed(self.cfg.train.seed)
        check_model(self.cfg, self.hf_config, lambda k: where_of(self.cfg, k), self.env.world_size)
        self.model, self._hf_deepspeed_config = build_model(self.cfg, self.hf_config, self.ds_config, self.attn,
                                                             self.task.model_task in LABELED_TASKS, len(self.tokenizer), self.task)
        self.n_params = count_parameters(self.model)
        experts = num_experts(self.hf_config)
        self.router = RouterMonitor(experts, experts_per_token(self.hf_config)) if experts else None
        # FLOPs per token (MFU, the startup line) count what a token passes through.
        self.n_active = active_parameters(self.model, experts, self.router.top_k) if experts else self.n_params
        self.lora = lora_settings(self.cfg, self.task.added_tokens)
        self.resized_embedding = bool(self.task.added_tokens) and bool(self.cfg.model.from_pretrained)

    def _restore(self, trust: bool) -> None:
        ckpt = self.checkpointer.resume_from
        state = self.checkpointer.load(self.engine, self.load_universal, trust)
        self.run_state.restore(state)
        self._check_data_order(ckpt, state)
        if state.get("global_batch") != self.global_batch:
            raise UserError(
                f"--resume: checkpoint {ckpt} was trained with global batch {state.get('global_batch')}, "
                f"this run has {self.global_batch}; keep micro_batch_size x grad_accum x world_size the same"
            )
        saved = state.get("callbacks") or {}
        for key, cb in self._stateful_callbacks().items():
            if key in saved:
                cb.load_state_dict(saved[key])
        self.logger.info(f"resumed from {ckpt} at step {self.step} ({self.samples_seen} samples seen)")

    def _check_data_order(self, ckpt: Path, state: dict) -> None:
        """A checkpoint's data position counts samples of the schedule that wrote it. Before
        "data_order" was saved, packed clm/mlm data already used today's schedule; line_by_line,
        labeled, chat and user tasks used another order, in which the position means nothing now."""
        packed_lm = self.cfg.task in ("clm", "mlm") and self.cfg.data.mode == "packed"
        order = state.get("data_order", DATA_ORDER if packed_lm else "batch-v1")
        if order != DATA_ORDER:
            raise UserError(
                f"--resume: checkpoint {ckpt} counts its data position in an older sample order ({order}) than this "
                f"bigtrain's ({DATA_ORDER}): resuming would train on other samples. Finish that run with the bigtrain "
                "that wrote it, or start a new run from its weights (bigtrain export, then model.from_pretrained)"
            )

    # The loop's position lives in the TrainState; these read and advance it.
    @property
    def step(self) -> int:
        return self.run_state.step

    @step.setter
    def step(self, value: int) -> None:
        self.run_state.step = value

    @property
    def samples_seen(self) -> int:
        return self.run_state.samples_seen

    @samples_seen.setter
    def samples_seen(self, value: int) -> None:
        self.run_state.samples_seen = value

    def _stateful_callbacks(self) -> dict:
        """Callbacks whose state goes into each checkpoint (their `state_dict()` is not empty),
        keyed by class and position so a resume hands each its own."""
        out = {}
        for i, cb in enumerate(self.callbacks):
            if cb.state_dict():
                out[f"{i}:{type(cb).__qualname__}"] = cb
        return out

    # ------------------------------------------------------------------ the loop

    def forward(self, batch: dict):
        if "segment_ids" in batch:
            # Packed rows (bigtrain_triton): the documents' ids already keep any padding apart;
            # the all-ones attention_mask only stops transformers inferring packing from
            # position ids (a host read), so the kernel need not apply it. The documents' bounds
            # are computed here, once per batch, not once per layer.
            from bigtrain.kernels.attention import document_bounds

            batch = {**batch, "padding_free": True, "segment_bounds": document_bounds(batch["segment_ids"])}
        if self.shard is not None:  # sequence parallel: this rank's slice of every sequence
            return self.shard(self.engine, batch)
        if self.lm_loss is not None and "labels" in batch:  # train.chunked_loss: no full logits
            out = self.lm_loss(self.engine, batch)
        else:
            out = self.engine(**batch)
        if self.router is not None and self.engine.training:
            self.router.observe(out)  # on the device; read at log steps
        return out

    def train(self) -> Outcome:
        t = self.cfg.train
        loader = Prefetcher(self.task.batch, self.schedule, self.samples_seen, pin=not self.on_cpu)
        self.log.open_bar(self.step, t.max_steps, t.progress)
        self.engine.train()
        self.stop.install()
        self.watchdog = self.stop.watchdog = StepWatchdog(self.env.rank, t.watchdog_factor, t.watchdog_min_seconds).start()
        self._losses: list = []  # (step, loss) read back but not yet logged
        self.loader = loader
        self.meter.start(self.step, loader.wait_s)
        self._epochs = self.task.progress(self.samples_seen).get("source_epochs", {})
        self.last_eval: dict = dict(self.run_state.last_eval)
        self._emit("on_train_start")
        outcome = self._loop(loader)
        if outcome.status != "completed":
            self._emit("on_stop", outcome.message or outcome.status)
        self._emit("on_train_end", outcome)
        return outcome

    def _loop(self, loader) -> Outcome:
        t = self.cfg.train
        try:
            outcome = None
            while self.step < t.max_steps and outcome is None:
                micro_batches = loader.next()
                self.runner.phase("data")
                outcome = self.after_step(self.train_step(micro_batches))
            self._land_saves(wait=True)  # every way out the ranks agree on commits the save in flight
            return outcome or Outcome("completed", last_eval=self.last_eval)
        except DivergedError as e:  # every rank: the fp16 loss scaler's state is the same on all
            self._land_saves(wait=True)
            return self._diverged(str(e))
        except CheckpointWriteError as e:  # every rank alike (checkpoint.save and the commit agree on it)
            return self._save_failed(e)
        except RuntimeError as e:
            raise_if_rank_lost(e, self.step + 1, self.env.rank, self.env.world_size)
            raise
        finally:
            self.checkpointer.join_writer()  # an error path: the files finish, uncommitted (.tmp-)
            if t.compile:
                self.logger.info(f"train.compile: {compile_summary()}")
            self.watchdog.close()
            loader.close()
            self.log.close_bar()
            if self.profiler is not None:
                self.profiler.close()  # a run that stopped inside the window keeps what was traced

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step; its loss and verdict stay on the device (read in `after_step`)."""
        this_step = self.step + 1
        self.watchdog.step_started(this_step)
        faults.at_step_start(this_step, self.env.rank)
        result = self.runner.run(micro_batches, this_step, self.samples_seen, self.forward)
        if self.router is not None:
            self.router.end_step()
        self.step, self.samples_seen = this_step, self.samples_seen + self.global_batch
        self.watchdog.step_finished()
        self.guard.add(result)
        return result

    def after_step(self, result: StepResult) -> Optional[Outcome]:
        """Logging, evaluation, checkpoints and stopping: the only place that reads the device."""
        t, step, state = self.cfg.train, self.step, self.run_state
        stopping = self.stop.poll()  # every rank, every step (a CPU collective: no device wait)
        state.eval_requested = state.save_requested = False
        self._emit("on_step_end", result)
        if state.stop_reason and not (state.eval_requested or state.save_requested):
            return Outcome("stopped", state.stop_reason, last_eval=self.last_eval)  # at once: no evaluation, no checkpoint
        last = step == t.max_steps
        log_now, eval_now = step % t.log_every == 0 or last, step % t.eval_every == 0 or last or state.eval_requested
        save_now = step % t.save_every == 0 or last or state.save_requested
        if not (log_now or eval_now or save_now or stopping):
            self.log.advance()
            return None
        outcome = self._judge()
        if outcome is not None:
            return outcome
        if log_now:
            self._land_saves(wait=False)
            self._log_losses(result.lr)
        else:
            self.log.advance()
        improved, evaluation = False, None
        if eval_now:
            evaluation = self.evaluate(downstream=self.downstream is not None and self.downstream.due(step, last))
            improved = self.checkpointer.is_best(evaluation.record)
            self._emit("on_eval", evaluation)
        if save_now or improved or stopping or state.save_requested:
            # The last step's and a stop's checkpoint are written before the run ends: no background.
            best = (evaluation.record, step, evaluation.report) if improved else None
            ckpt = self.save(background=self.checkpointer.saver is not None and not (last or stopping), best=best)
            if stopping:
                self.logger.info(f"stopping at step {step} ({self.stop.reason}): checkpoint {ckpt}; continue with --resume auto")
                return Outcome("preempted", last_eval=self.last_eval)
        if state.stop_reason:
            self._flush_losses()  # metrics.jsonl keeps every step trained
            self.logger.info(f"stopping at step {step}: {state.stop_reason}")
            return Outcome("stopped", state.stop_reason, last_eval=self.last_eval)
        return None

    def _emit(self, event: str, *args) -> None:
        """One event of bigtrain.api.Callback to every callback, with the loop's state."""
        for cb in self.callbacks:
            getattr(cb, event)(self.run_state, *args)

    def _judge(self) -> Optional[Outcome]:
        """Read the pending steps' results (one gather) and act on the guard's verdict."""
        verdict = self.guard.resolve()
        for record in verdict.records:
            self.log.record(record)
        for message in verdict.messages:
            self.logger.info(message)
        self._losses += verdict.losses
        if verdict.stop is None:
            return None
        self._flush_losses()  # keep the losses up to the stop in metrics.jsonl
        if not verdict.save_before_stop:
            return self._diverged(verdict.stop)
        # The non-finite steps were never applied: these weights are good.
        ckpt = self.save()
        return Outcome("diverged", f"training stopped at {verdict.stop}. Checkpoint {ckpt} holds the weights before it. "
                                   "Inspect those samples, then continue with --resume auto (the data position is after them) or lower train.lr.")

    def _diverged(self, why: str) -> Outcome:
        last = self.checkpointer.latest()
        kept = f"the last good checkpoint is {last} (nothing was saved after it)" if last else "no checkpoint was written before it"
        return Outcome("diverged", f"training stopped: {why}; {kept}. Try deepspeed.precision=bf16 or a lower train.lr, then --resume auto.")

    def _save_failed(self, e: CheckpointWriteError) -> Outcome:
        self._flush_losses()  # metrics.jsonl keeps every step trained
        last = self.checkpointer.latest()
        kept = f"the last good checkpoint is step {read_state(last)['step']} ({last})" if last else "no checkpoint was written before it"
        return Outcome("save_failed", f"{e}; {kept}. Free space, then continue with --resume auto")

    def _flush_losses(self) -> None:
        for step, loss in self._losses:
            self.log.record({"step": step, "loss": loss})
        self._losses = []

    def _log_losses(self, lr: float) -> None:
        """One record per step with train.log_every=1, else one with the mean since the last log."""
        numbers = self.meter.measure(self.step, self.loader.wait_s)
        extra = {**numbers, "tokens": self.samples_seen * self.cfg.data.seq_len, **self._step_numbers()}
        at = lambda step: self.task.progress(self.samples_seen - (self.step - step) * self.global_batch)  # noqa: E731
        if self.cfg.train.log_every == 1:
            records = [{"step": step, "loss": loss, "lr": lr, **extra, **at(step)} for step, loss in self._losses]
        else:
            records = [{"step": self.step, "loss": sum(v for _, v in self._losses) / len(self._losses), "lr": lr, **extra,
                        **at(self.step)}] if self._losses else []
        for record in records:
            self.log.record(record)
            self._emit("on_log", record)
        self._log_epochs()
        bar = {"tok_s": f"{numbers['tokens_per_s']:,.0f}"}
        if "mfu" in numbers:
            bar["mfu"] = f"{100 * numbers['mfu']:.1f}%"
        if self._losses:
            self.log.advance(loss=f"{self._losses[-1][1]:.3f}", **bar)
        else:
            self.log.advance()
        self._losses = []

    def _log_epochs(self) -> None:
        """A line when a source of the mixture starts another epoch (a fresh permutation)."""
        epochs = self.task.progress(self.samples_seen).get("source_epochs", {})
        for name, epoch in epochs.items():
            if epoch > self._epochs.get(name, epoch):
                self.logger.info(f"source '{name}' started epoch {epoch} (a new order of its blocks) by step {self.step}")
        self._epochs = epochs

    def _step_numbers(self) -> dict:
        """The last step's gradient norm (and loss scale in fp16), the skipped steps so far."""
        out = {"skipped_steps": self.run_state.skipped_steps}
        norm = self.engine.get_global_grad_norm()
        if norm is None and self.runner.skip is not None:
            norm = self.runner.skip.grad_norm
        if norm is not None:
            out["grad_norm"] = float(norm)
        if self.guard.loss_scale_watch is not None:
            out["loss_scale"] = self.guard.loss_scale_watch.scale
        if self.router is not None:
            out.update(self.router.numbers())
        return out

    @property
    def state(self) -> dict:
        return {
            **self.run_state.saved(),
            # What the export and `bigtrain eval` build: a user's task trains one of the built-in models.
            "task": self.task.model_task if is_reference(self.cfg.task) else self.cfg.task,
            "tokens_seen": self.samples_seen * self.cfg.data.seq_len,
            "global_batch": self.global_batch,
            "data_order": DATA_ORDER,
            "world_size": self.env.world_size,
            "tensor_parallel": self.layout.tp,
            "expert_parallel": self.cfg.deepspeed.expert_parallel,
            "sequence_parallel": self.layout.sp,
            "zero_stage": self.ds_config["zero_optimization"]["stage"],
            "precision": self.precision,
            "seed": self.cfg.train.seed,
            "lora": self.lora,
            "resized_embedding": self.resized_embedding,
            "callbacks": {key: cb.state_dict() for key, cb in self._stateful_callbacks().items()},
        }

    def save(self, background: bool = False, best: Optional[tuple] = None) -> Path:
        """A checkpoint of this step. metrics.jsonl records how long the loop stood still for it
        (`checkpoint_blocking_s`: a synchronous save's write, seal and commit; a background save's
        snapshot) and how long it first waited for the save in flight (`checkpoint_wait_s`). A
        background save is committed later (`_land_saves`); `best` = (record, step, report) marks
        the checkpoint as the best one once it is committed."""
        import time

        start = time.perf_counter()
        waited = self.checkpointer.in_flight()
        self._land_saves(wait=True)  # at most one save in flight
        t0 = time.perf_counter()
        if background:
            ckpt = self.checkpointer.start_save(self.state, self.hf_config, self.tokenizer, {"best": best})
        else:
            ckpt = self.checkpointer.save(self.engine, self.state, self.hf_config, self.tokenizer)
        record = {"step": self.step, "checkpoint": ckpt.name, "checkpoint_blocking_s": round(time.perf_counter() - t0, 4)}
        if waited:
            record["checkpoint_wait_s"] = round(t0 - start, 4)
        self.log.record({**record, "checkpoint_background": True} if background else record)
        if not background:
            self._saved(ckpt, best)
        return ckpt

    def _land_saves(self, wait: bool) -> None:
        """Commit the checkpoint written in the background once every rank's writer is done
        (`wait`: wait for it). Collective: called where every rank is (log steps, saves, the end)."""
        done = self.checkpointer.land(wait)
        if done is None:
            return
        self.log.record({"step": self.step, "checkpoint": done.final.name, "checkpoint_total_s": round(done.note["total_s"], 4)})
        self._saved(done.final, done.note.get("best"))

    def _saved(self, ckpt: Path, best: Optional[tuple]) -> None:
        """A checkpoint is committed: the best one if its evaluation is, and the on_save event."""
        if best is not None:
            self.checkpointer.mark_best(ckpt, *best)
        self._emit("on_save", ckpt)

    def _downstream(self):
        """eval.downstream: its tasks loaded and checked now, before any step (bigtrain/downstream.py)."""
        if not self.cfg.eval.downstream.tasks:
            return None
        from bigtrain.downstream import InLoop

        return InLoop(self.cfg, where_of(self.cfg, "eval.downstream.tasks"))

    def evaluate(self, downstream: bool = False) -> Evaluation:
        """The task's evaluation, and with `downstream` the harness's tasks on the live model (every
        rank takes its share of the requests; under ZeRO-3 the forward gathers what it needs)."""
        self.engine.eval()
        evaluation = self.task.evaluate(self.forward, self.comm)
        if downstream:
            numbers = self.downstream.run(self.engine.module, self.tokenizer, self.layout.dp_rank, self.layout.dp)
            evaluation = Evaluation({**evaluation.record, **numbers}, evaluation.line + "; " + ", ".join(
                f"{k.removeprefix('downstream/')} {v:.4g}" for k, v in numbers.items() if k != "downstream/requests"), evaluation.report)
        self.engine.train()
        if evaluation.record:
            self.last_eval = self.run_state.last_eval = {"step": self.step, **evaluation.record}
            self.log.record(self.last_eval)
            self.logger.info(f"step {self.step}: {evaluation.line}")
        return evaluation

    def finish(self, sample: bool = True) -> Optional[Path]:
        """Rank 0: export the final (or best) model, plot the loss curve, print a sample."""
        import torch.distributed as dist

        self.log.close()
        # Export and sampling run on rank 0 alone: no sequence-parallel attention for them.
        self._unregister_sequence_parallel()
        if self._hf_deepspeed_config is not None:
            # Export and sampling build plain models on rank 0 alone: switch transformers'
            # ZeRO-3 mode off, or their construction would wait on collectives.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            self._hf_deepspeed_config = None
            unset_hf_deepspeed_config()
        model_dir = self._export_and_plot() if self.env.rank == 0 else None
        if model_dir is not None and sample and self.cfg.task == "clm" and self.cfg.train.sample_tokens > 0:
            from bigtrain.generate import generate

            text = generate(model_dir, self.cfg.train.sample_prompt, max_new_tokens=self.cfg.train.sample_tokens, temperature=0.8, top_k=40, seed=self.cfg.train.seed)
            self.logger.info("sample:\n" + text)
        dist.barrier()
        return model_dir

    def close(self, status: str = "FINISHED") -> None:
        """End the run in order on every rank: metrics and trackers closed (status: FINISHED,
        KILLED for a preempted run, FAILED), then the process group torn down after a barrier.
        (Left to interpreter exit, gloo's threads could still be talking to a rank that already
        exited, and the process aborted: "terminate called without an active exception", seen
        after a preemption stop.)"""
        import torch.distributed as dist

        self.log.close(status)
        getattr(self, "_unregister_sequence_parallel", lambda: None)()  # also after a failed run (notebooks, tests)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if self.run_lock is not None:
            self.run_lock.release()

    def _export_and_plot(self) -> Optional[Path]:
        from bigtrain.export import export

        src, note = self.checkpointer.export_source()
        if note:
            self.logger.info(note)
        model_dir = export(src, self.output_dir / "model", overwrite=True) if self.cfg.train.export else None
        best = self.checkpointer
        if best.best_report:
            (self.output_dir / "eval_report.txt").write_text(best.best_report + "\n")
            self.logger.info(f"evaluation of the exported model (step {best.best['step']}):\n{best.best_report}")
        png = plot_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png")
        self.logger.info(f"model: {model_dir}" if model_dir else f"train.export=false: no model exported (bigtrain export {src} OUT_DIR writes it)")
        if png:
            self.logger.info(f"loss curve: {png}")
        return model_dir


def user_callbacks(cfg: Config) -> list[Callback]:
    """train.callbacks, each built with its keyword arguments (a failing constructor is one error line)."""
    from bigtrain.config import callback_specs

    out = []
    for cls, kwargs, where in callback_specs(cfg):
        try:
            out.append(cls(**kwargs))
        except Exception as e:  # noqa: BLE001 - the user's constructor: its message, where it was configured
            raise UserError(f"{where}: {cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                            f"{type(e).__name__}: {e}") from None
    return out


def run_training(cfg: Config, resume: Optional[str], overwrite: bool, trust_checkpoint: bool = False) -> int:
    return run_trainer(Trainer(cfg, resume=resume, overwrite=overwrite, trust_checkpoint=trust_checkpoint))


def run_trainer(trainer: Trainer) -> int:
    """Train, then export; the exit code says how it ended (0, preempted, diverged, a rank lost)."""
    if trainer.step >= trainer.cfg.train.max_steps:
        trainer.logger.info(f"nothing to do: the checkpoint is at step {trainer.step} >= train.max_steps={trainer.cfg.train.max_steps}")
    try:
        outcome = trainer.train()
    except RankLost as e:
        last = trainer.checkpointer.latest()
        kept = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
        print(f"error: rank {trainer.env.rank}: {e}; {kept}. Restart the job with --resume auto.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The process group is broken: tearing it down could block on the lost peer.
        release_shm_buffers()
        os._exit(RANK_LOST_EXIT_CODE)
    if outcome.status in ("diverged", "save_failed"):
        trainer.logger.info(f"error: {outcome.message}")
    elif outcome.status == "completed" or (outcome.status == "stopped" and trainer.checkpointer.latest() is not None):
        # A run a callback stopped (early stopping) is as finished as a completed one: exported.
        if "eval_ppl" in outcome.last_eval:
            trainer.logger.info(f"final validation loss {outcome.last_eval['eval_loss']:.4f}, perplexity {outcome.last_eval['eval_ppl']:.2f}")
        trainer.finish()
    trainer.close({"preempted": "KILLED", "diverged": "FAILED", "save_failed": "FAILED"}.get(outcome.status, "FINISHED"))
    return outcome.exit_code
