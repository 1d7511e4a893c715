"""The one training loop every stage runs on.

A `Stage` (training/stage.py) supplies what differs between pretraining, SFT, DPO and RL: its
batches (with a position that can be saved and restored), its loss, its evaluation and any work
between optimizer steps. The `Trainer` owns everything else — optimizer, schedule, accumulation,
clipping, autocast, evaluation cadence, checkpoints, exact resume, metrics and events — so a new
stage never copies the loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from minigpt_cli.config.loader import dump_config
from minigpt_cli.config.params import flops_per_token
from minigpt_cli.config.schema import Config, memory_is_percent, parse_duration, parse_memory
from minigpt_cli.engine.core.events import EventCallback, emit
from minigpt_cli.engine.core.io import atomic_write_text, make_dir
from minigpt_cli.engine.core.seeding import restore_rng, rng_state
from minigpt_cli.engine.hardware.device import PrecisionDecision, autocast_context
from minigpt_cli.engine.hardware.monitor import CpuMeter, physical_memory_bytes, tree_rss_bytes
from minigpt_cli.engine.hardware.speed_cache import peak_flops
from minigpt_cli.engine.model import kernels
from minigpt_cli.engine.resources.governor import (
    Adjustment,
    CpuThrottle,
    Governor,
    MemoryCapExceeded,
    cap_device_memory,
    install_throttle,
)
from minigpt_cli.engine.resources.memory import memory_cap_bytes
from minigpt_cli.engine.runs import checkpoint as ckpt
from minigpt_cli.engine.runs.files import (
    CONFIG_FILE,
    METRICS_FILE,
    OPTIMIZER_FILE,
    load_tensors,
    read_metadata,
)
from minigpt_cli.engine.training import budget, distributed, limits, optim
from minigpt_cli.engine.training.pace import Schedule
from minigpt_cli.engine.training.plot import plot_run
from minigpt_cli.engine.training.run_spec import RunSpec, TrainingInterrupted
from minigpt_cli.engine.training.stage import Batch, Stage, TrainedModel
from minigpt_cli.engine.training.step_agreement import StepAgreement
from minigpt_cli.errors import UserError


class Trainer:
    """Runs a Stage to completion, checkpointing and logging as the config says."""

    _resumed_from: Path | None  # the checkpoint a resumed run started from (set by `_fit`)
    _saved_schedule: dict[str, Any] | None  # a resumed run's saved plan and pace (set by `_fit`)

    def __init__(
        self,
        config: Config,
        stage: Stage,
        model: TrainedModel,
        spec: RunSpec,
        *,
        device: torch.device,
        precision: PrecisionDecision,
        on_event: EventCallback | None = None,
        vocab_size: int,
        micro_batch_size: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.config = config
        # Every wall-clock reading of the run (time limit, schedule plan, tokens/s, ETA, elapsed)
        # comes from this one seam, so a test can run a time-limited run on a fake clock.
        self._clock = clock
        self.train = config.stage_train(stage.name)
        self.stage = stage
        self.model = model
        self.spec = spec
        self.device = device
        self.precision = precision
        self.on_event = on_event
        self.vocab_size = vocab_size
        self._autocast = lambda: autocast_context(precision, device)
        # The governor may start below the configured micro-batch; a resumed run restores its own.
        self.micro_batch_size = micro_batch_size or self.train.micro_batch_size
        self.optimizer, self.param_names = optim.build_optimizer(model, self.train, device)
        self.scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
        self.step = self.tokens = 0
        self.elapsed_before = 0.0
        self.finished = False
        self.stop_reason = ""
        self._forward_model: torch.nn.Module = model
        self._compile_pending = bool(self.train.compile)
        self._kernel_note_pending = True
        # Under torchrun: this process's rank; one process is rank 0 of 1 (training/distributed).
        self.ranks = distributed.ranks()
        self._ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self._agreement = StepAgreement(self.ranks)  # the stop step and deadline plan, shared

    # -------------------------------------------------------------------------------- helpers

    @property
    def accumulation(self) -> int:
        return self.train.global_batch_size // self.micro_batch_size

    def _event(self, kind: str, /, **data: Any) -> None:
        # Metric rows carry their own `stage`/`kind` keys; the event already says both.
        payload = {k: v for k, v in data.items() if k not in ("stage", "kind")}
        emit(self.on_event, kind, self.stage.name, **payload)

    def _state(
        self,
        data_state: dict[str, Any],
        rng: dict[str, Any],
        rng_ranks: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        # A --max-time run's schedule is planned from wall-clock measurements: saved so a resume
        # goes on with the same plan. Other runs' state holds no wall-clock field but `elapsed`.
        schedule = self.schedule.state()
        return {
            "stage": self.stage.name,
            "tokens": self.tokens,
            "elapsed": self._elapsed(),
            "data_state": data_state,
            "rng": rng,
            **({"world_size": self.ranks.world_size} if self.ranks.world_size > 1 else {}),
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            "micro_batch_size": self.micro_batch_size,
            "activation_checkpointing": self._checkpointing(),
            "threads": torch.get_num_threads(),
            "total_steps": self.total_steps,
            **({"schedule": schedule} if schedule else {}),
            "parent": self.spec.parent,
            "chat": self.spec.chat,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "sources": self.spec.sources,
            "extra": self.stage.extra_state(),
        }

    def save(
        self, data_state: dict[str, Any], rng: dict[str, Any], *, gather: bool = True
    ) -> Path | None:
        """Checkpoint the model, optimizer and trainer state at the current step.

        Under several processes every rank calls it: their random states are gathered (each
        rank's, for an exact resume at the same world size; `gather=False` after a Ctrl-C, when
        the ranks may be anywhere and only rank 0's own is kept) and rank 0 alone writes; the
        others return None. The weights, optimizer and data position are the same on every rank.
        """
        rng_ranks = (
            distributed.gather_objects(rng) if gather and self.ranks.world_size > 1 else None
        )
        if not self.ranks.is_writer:
            return None
        optimizer_tensors, optimizer_meta = ckpt.optimizer_tensors(self.optimizer, self.param_names)
        files = {
            **self.stage.weight_files(self.model),
            OPTIMIZER_FILE: (optimizer_tensors, optimizer_meta),
        }
        folder = ckpt.save_checkpoint(
            self.spec.run_dir,
            self.step,
            files,
            self._state(data_state, rng, rng_ranks),
            self.train.keep_last,
        )
        self._event("checkpoint", step=self.step, path=str(folder))
        self.metrics.write(self._row("event", event="checkpoint", message=f"saved {folder.name}"))
        return folder

    def _row(self, kind: str, **values: Any) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "kind": kind,
            "step": self.step,
            "tokens": self.tokens,
            "time": round(self._elapsed(), 3),
            **values,
        }

    def _restore(self) -> None:
        point = ckpt.find_resume_point(self.spec.run_dir)
        if point is None:
            raise UserError(f"{self.spec.run_dir}: no complete checkpoint to resume from")
        state = ckpt.read_state(point)
        self.stage.load_weight_files(self.model, point)
        tensors = load_tensors(point / OPTIMIZER_FILE)
        ckpt.restore_optimizer(
            self.optimizer,
            tensors,
            read_metadata(point / OPTIMIZER_FILE),
            self.param_names,
        )
        self.step = int(state["step"])
        self.tokens = int(state["tokens"])
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.micro_batch_size = int(state.get("micro_batch_size", self.micro_batch_size))
        if self.train.global_batch_size % self.micro_batch_size:
            self.micro_batch_size = self.train.micro_batch_size
        if state.get("activation_checkpointing"):
            self.model.config.activation_checkpointing = True
        self.stage.load_data_state(state["data_state"])
        self.stage.load_extra_state(state.get("extra", {}))
        rng, note = distributed.rank_random_state(state, self.ranks)
        restore_rng(rng)
        if note:
            self._event("note", message=note)
            self.spec.events.append({"event": "note", "message": note})
        self._resumed_from = point
        self._saved_schedule = state.get("schedule")

    def _start_distributed(self) -> None:
        """Agree on the micro-batch (the smallest any rank's memory plan chose), check that the
        ranks can share it, and wrap the model in DistributedDataParallel, which also makes
        every rank start from rank 0's weights."""
        distributed.refuse_unsupported(self.stage.name, self.train.max_time, self.ranks.world_size)
        (smallest,) = distributed.min_ints([self.micro_batch_size])
        self.micro_batch_size = distributed.shareable_micro_batch(
            smallest, self.train.global_batch_size, self.ranks.world_size
        )
        self._ddp = distributed.wrap_model(self.model, self.device)
        self._forward_model = self._ddp

    # -------------------------------------------------------------------------------- the loop

    def fit(self) -> dict[str, Any]:
        """Train until a limit is reached; returns the final summary (also emitted as stage_end)."""
        self.throttle = CpuThrottle.from_percent(self.config.resources.max_cpu)
        # Evaluation and rollouts generate under the same CPU cap as the steps.
        previous_throttle = install_throttle(self.throttle)
        try:
            with self._agreement.interrupts_deferred():
                return self._fit()
        finally:
            install_throttle(previous_throttle)

    def _fit(self) -> dict[str, Any]:
        run_dir = self.spec.run_dir
        writer = self.ranks.is_writer
        if writer:
            make_dir(run_dir)
        self._start = self._clock()
        sequences_per_step = self.train.global_batch_size
        # Tokens that carry loss per sequence: a full window in pretraining, the mean trained
        # tokens of an example in fine-tuning (so --max-tokens counts what it says).
        per_sequence = self.stage.mean_loss_tokens or self.stage.seq_len
        tokens_per_step = max(1, round(sequences_per_step * per_sequence))
        # An RL stage runs several optimizer steps per iteration; its lengths and cadences count
        # iterations (its config says "100 iterations", not "100 x steps_per_iteration steps").
        unit = int(self.stage.steps_per_iteration)
        self.total_steps = unit * optim.plan_steps(
            self.train,
            tokens_per_step * unit,
            sequences_per_step * unit,
            self.stage.sequences_per_epoch(),
        )
        epochs_note = limits.epochs_cut_short(
            self.train, self.stage.sequences_per_epoch(), sequences_per_step, unit
        )
        if epochs_note:
            self._event("note", message=epochs_note)
        self._resumed_from = None
        self._saved_schedule = None
        self._last_eval: dict[str, float] = {}  # the newest eval row, for the summary
        if self.spec.resume:
            self._restore()
        if self.ranks.world_size > 1:
            self._start_distributed()
        # One writer: the other ranks' rows go nowhere (rank 0's hold the whole job's figures).
        self.metrics: ckpt.MetricsLog | distributed.NoMetrics = (
            ckpt.MetricsLog(
                run_dir / METRICS_FILE, keep_through_step=self.step if self.spec.resume else None
            )
            if writer
            else distributed.NoMetrics()
        )
        if self.spec.resume and self.step >= self.total_steps:
            self.metrics.close()
            return {"nothing_to_do": True, "step": self.step, "total_steps": self.total_steps}
        self.finished = False
        limit, note = budget.phase_time_limit(self.stage.name, self.train.max_time, self._elapsed())
        if note:  # a pipeline's time budget (quickstart) is this run's max_time, in config.toml
            self.train.max_time = getattr(self.config, self.stage.name).max_time = limit
            self._event("note", message=note)
        if writer:
            atomic_write_text(run_dir / CONFIG_FILE, dump_config(self.config))
        warmup, warmup_note = limits.warmup_steps(self.train.warmup_steps, self.total_steps)
        if warmup_note:
            self._event("note", message=warmup_note)
        max_seconds = parse_duration(self.train.max_time) if self.train.max_time else None
        self.schedule = Schedule(
            peak=self.train.learning_rate,
            floor=self.train.min_lr,
            warmup=warmup,
            total_steps=self.total_steps,
            unit=unit,
            eval_every=self.train.eval_every * unit,
            save_every=self.train.save_every * unit,
            deadline=max_seconds is not None,
            saved=self._saved_schedule,
        )
        cap_bytes = memory_cap_bytes(self.config.resources)  # under torchrun: this rank's share
        cap_mb = cap_bytes / 2**20
        self.governor = Governor(cap_bytes, on_pause=self._governor_notice)
        if self.device.type in ("cuda", "mps"):
            note = cap_device_memory(  # each rank has its own device: the whole cap applies
                self.device.type,
                parse_memory(self.config.resources.max_memory, physical_memory_bytes()),
                physical_memory_bytes(),
                memory_is_percent(self.config.resources.max_memory),
            )
            if note:
                self._event("note", message=note)
        flops_token = flops_per_token(self.config.model, self.vocab_size, self.stage_seq_len())
        peak = self._peak_flops()
        if peak is not None:
            peak *= self.ranks.world_size  # tokens/s counts every rank: so does the peak
        cpu = CpuMeter()
        events = list(self.spec.events)
        if self._resumed_from is not None:
            events.insert(0, {"event": "resume", "message": f"resumed from {self._resumed_from}"})
        # `auto` differs by machine: the folder says what the steps (and their MFU) ran in.
        for extra in [*events, {"event": "precision", "message": self.precision.reason}]:
            self.metrics.write(self._row("event", **extra))
        self._event(
            "stage_start",
            step=self.step,
            total_steps=self.total_steps,
            tokens_per_step=tokens_per_step,
            micro_batch_size=self.micro_batch_size,
            accumulation=self.accumulation,
            world_size=self.ranks.world_size,
            precision=self.precision.reason,
            run_dir=str(run_dir),
            resumed=self._resumed_from is not None,
        )
        if self.stage.evaluate_at_start and self.step == 0:
            self._timed_evaluate()  # the baseline a stage's gains are read against (RL's "before")
        window_tokens = 0
        window_metrics: dict[str, list[float]] = {}
        data_state, rng = self.stage.data_state(), rng_state()
        self.governor.start()
        self.throttle.restart()
        # Tokens/s and the ETA are read off the wall clock between train rows, so everything the
        # loop does (data, logging, the governor, evaluations, saves) is in them.
        loop_start = window_start = self._clock()
        session_tokens = self.tokens
        steps_end = loop_start  # the wall clock at the end of the newest step
        try:
            while True:
                step_start = self._clock()
                data_state, rng = self.stage.data_state(), rng_state()
                self.model.train()
                self.stage.before_step(self.model, self.step)
                lr = self.schedule.learning_rate(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_value, step_metrics, step_tokens = self._optimizer_step()
                grad_norm = step_metrics.pop("grad_norm")
                self.step += 1
                self.tokens += step_tokens
                window_tokens += step_tokens
                for key, value in {"loss": loss_value, **step_metrics}.items():
                    window_metrics.setdefault(key, []).append(value)
                now = steps_end = self._clock()
                elapsed, interrupted = self._agreement.step_end(self._elapsed(now))
                if interrupted:  # a Ctrl-C under several processes: all stop after this step
                    self.save(self.stage.data_state(), rng_state())  # every rank's RNG gathered
                    self.metrics.close()
                    raise TrainingInterrupted(run_dir, self.step)
                stop = limits.stop_reason(
                    self.train,
                    step=self.step,
                    total_steps=self.total_steps,
                    unit=unit,
                    tokens=self.tokens,
                    epochs_done=self.stage.epochs_done,
                    elapsed=elapsed,
                    max_seconds=max_seconds,
                )
                if self.step % (self.train.log_every * unit) == 0 or stop:
                    rate = window_tokens / max(now - window_start, 1e-9)
                    averaged = {k: float(np.mean(v)) for k, v in window_metrics.items()}
                    rss_mb = tree_rss_bytes() / 2**20
                    row = self._row(
                        "train",
                        **averaged,
                        lr=lr,
                        horizon=self.schedule.plan.horizon,
                        grad_norm=grad_norm,
                        tokens_per_sec=round(rate, 1),
                        mfu=round(flops_token * rate / peak, 4) if peak else None,
                        rss_mb=round(rss_mb, 1),
                        rss_cap_mb=round(cap_mb, 1),
                        cpu_pct=round(cpu.read(), 1),
                        cpu_cap_pct=self.config.resources.max_cpu,
                        micro_batch_size=self.micro_batch_size,
                        world_size=self.ranks.world_size,
                        eta_sec=round(
                            self.schedule.eta(
                                self.step,
                                elapsed,
                                max_seconds,
                                (now - window_start) / len(window_metrics["loss"]),
                            ),
                            1,
                        ),
                    )
                    self.metrics.write(row)
                    self._event("step", **row, total_steps=self.schedule.plan.horizon)
                    window_tokens, window_metrics, window_start = 0, {}, now
                if self._kernel_note_pending:  # which compiled kernels the first step ran
                    self._kernel_note_pending = False
                    kernel_note = kernels.note(self._clock() - step_start)
                    if kernel_note:
                        self._event("note", message=kernel_note)
                # After the step's row (which shows the settings it ran with), before any save.
                self._govern_memory()
                self.schedule.pace.add_step(self.step, self._clock() - step_start)
                if max_seconds is not None and not stop:
                    # Before the save (it holds the next step's plan); rank 0 plans for all ranks.
                    remaining = max_seconds - self._elapsed()
                    warmup_note = self.schedule.replan(self.step, remaining) if writer else None
                    self._agreement.share_schedule(self.schedule)
                    if warmup_note:
                        self._event("note", message=warmup_note)
                if self.step % (self.train.eval_every * unit) == 0 or stop:
                    self._timed_evaluate()
                if stop:
                    self.finished = True
                    self.stop_reason = stop
                if self.step % (self.train.save_every * unit) == 0 or stop:
                    save_start = self._clock()
                    self.save(self.stage.data_state(), rng_state())
                    self.schedule.pace.save_seconds = self._clock() - save_start
                if stop:
                    break
        except MemoryCapExceeded as over:
            # The step completed; its state is consistent, so keep it and say how to go on.
            self.save(self.stage.data_state(), rng_state(), gather=False)
            self.metrics.close()
            raise UserError(
                f"{over}; checkpoint saved at step {self.step}: resume with --resume and a "
                "higher --max-memory (or a smaller model.context_length)"
            ) from None
        except OSError:
            # The machine refused a write (full disk, removed folder...): the newest complete
            # snapshot stands; the caller says what was kept and how to continue.
            self.metrics.close()
            raise
        except KeyboardInterrupt:
            # Roll back to the start of the unfinished step so the checkpoint is exact.
            self.optimizer.zero_grad(set_to_none=True)
            self.stage.load_data_state(data_state)
            with distributed.second_interrupt_ignored(self.ranks.world_size > 1):
                self.save(data_state, rng, gather=False)
            self.metrics.close()
            raise TrainingInterrupted(run_dir, self.step) from None
        self.metrics.close()
        # This session's tokens over its wall clock, to the end of the last step.
        summary = self._summary((self.tokens - session_tokens) / max(steps_end - loop_start, 1e-9))
        self._plot()
        self._event("stage_end", **summary)
        return summary

    def _elapsed(self, now: float | None = None) -> float:
        """Training seconds of the whole run: earlier sessions' and this one's."""
        return self.elapsed_before + (self._clock() if now is None else now) - self._start

    def _timed_evaluate(self) -> None:
        began = self._clock()
        self._evaluate()
        self.schedule.pace.eval_seconds = self._clock() - began

    def _checkpointing(self) -> bool:
        return bool(self.model.config.activation_checkpointing)

    def _govern_memory(self) -> None:
        adjustment = self.governor.after_step(
            self.micro_batch_size, self.train.global_batch_size, self._checkpointing()
        )
        if self.ranks.world_size > 1:
            adjustment = distributed.shared_adjustment(
                adjustment,
                self.micro_batch_size,
                self._checkpointing(),
                self.train.global_batch_size,
                self.ranks.world_size,
            )
        if adjustment is not None:
            self._apply(adjustment)

    def _apply(self, adjustment: Adjustment) -> None:
        self.micro_batch_size = adjustment.micro_batch_size
        if adjustment.activation_checkpointing and not self._checkpointing():
            self.model.config.activation_checkpointing = True
        self._governor_notice(adjustment.message)

    def _governor_notice(self, message: str) -> None:
        self.metrics.write(self._row("event", event="governor", message=message))
        self._event("governor", message=message)

    def stage_seq_len(self) -> int:
        return int(self.stage.seq_len)

    def _peak_flops(self) -> float | None:
        # RuntimeError: this device cannot run the precision's matmul at all, so there is no peak
        # to divide by and MFU is left out. A cache that cannot be read or written is no error
        # (`speed_cache` only measures again), so nothing else is caught.
        try:
            return peak_flops(self.device.type, self.precision.dtype_name)
        except RuntimeError:
            return None

    def _optimizer_step(self) -> tuple[float, dict[str, float], int]:
        # Every rank draws the whole step's micro-batches (so the data position, the token count
        # and the normaliser are the same everywhere) and trains on its own contiguous share.
        micro_batches = [
            self.stage.next_batch(self.micro_batch_size) for _ in range(self.accumulation)
        ]
        step_tokens = sum(self.stage.count_tokens(batch) for batch in micro_batches)
        # The loss is summed per micro-batch and divided by the whole step's count (tokens, or
        # pairs for preference stages), so accumulation gives the same update as one big batch.
        normaliser = max(sum(self.stage.loss_normaliser(batch) for batch in micro_batches), 1)
        world, share = self.ranks.world_size, len(micro_batches) // self.ranks.world_size
        mine = micro_batches[self.ranks.rank * share : (self.ranks.rank + 1) * share]
        total_loss = 0.0
        summed: dict[str, float] = {}
        for index, batch in enumerate(mine):
            self.throttle()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            # DDP averages gradients over the ranks when the last micro-batch's backward runs
            # (the others accumulate locally, no_sync); times `world` makes that average the
            # sum over the whole global batch, divided by its normaliser as in one process.
            synced = self._ddp is None or index == len(mine) - 1
            with contextlib.nullcontext() if synced else self._ddp.no_sync():  # type: ignore[union-attr]
                loss_sum, metrics = self._forward(batch)
                loss = loss_sum / normaliser
                optim.backward(loss * world if world > 1 else loss, self.scaler)
            total_loss += float(loss_sum.detach())
            for key, value in metrics.items():
                summed[key] = summed.get(key, 0.0) + value / len(micro_batches)
        if world > 1:  # the figures of the whole global batch, not of this rank's share
            total_loss, summed = distributed.sum_step_figures(total_loss, summed)
        summed["grad_norm"] = optim.apply_update(self.optimizer, self.train.grad_clip, self.scaler)
        return total_loss / normaliser, summed, step_tokens

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        if self._compile_pending:
            self._compile_pending = False
            try:
                # The stubs type torch.compile's result as a plain callable; given a module it is
                # one (an `OptimizedModule` wrapping it), which is what a stage's loss takes.
                compiled = cast(torch.nn.Module, torch.compile(self._forward_model))
                with self._autocast():
                    result = self.stage.loss(compiled, batch)
                self._forward_model = compiled
                self._event("note", message="torch.compile is on")
                return result
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
                self._event("note", message=f"torch.compile failed, running eagerly ({error})")
                self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            return self.stage.loss(self._forward_model, batch)

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad(), self._autocast():
            results = self.stage.evaluate(self.model)
        self.model.train()
        row = self._row("eval", **results)
        self.metrics.write(row)
        self._event("eval", **row)
        self._last_eval = results
        return results

    def _summary(self, tokens_per_sec: float) -> dict[str, Any]:
        return {
            "run_dir": str(self.spec.run_dir),
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "seconds": round(self._elapsed(), 2),
            "tokens_per_sec": round(tokens_per_sec, 1),
            "stop_reason": self.stop_reason,
            **self._last_eval,
        }

    def _plot(self) -> None:
        if self.config.log.plot and self.ranks.is_writer:
            note = plot_run(self.spec.run_dir, self.step)
            if note:
                self._event("note", message=note)
