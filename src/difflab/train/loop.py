"""The training loop: AdamW with linear warm-up, gradient clipping and accumulation, EMA,
optional bf16 autocast, checkpoints, logs and sample grids. It knows nothing about diffusion:
everything model-specific comes from a `Task` (its loss, the modules it keeps frozen, a hook
after each update; see the protocol in `difflab.train.tasks`).

Repeatability: every random draw of step s on shard j (noise, timesteps, condition dropout,
dropout) comes from generators seeded with (seed, s, j), and the data of (s, j) is fixed by
`ShardSchedule`. A resumed run therefore computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from difflab.data.seeding import derive_seed
from difflab.devices import slow_dtype_reason
from difflab.train.batches import ShardSampler, ShardSchedule
from difflab.train.checkpoint import (
    capture_rng,
    latest_checkpoint,
    restore_rng,
    save_checkpoint,
    save_sharded_checkpoint,
)
from difflab.train.config import Config
from difflab.train.distributed import Dist
from difflab.train.ema import EMA
from difflab.train.monitor import LogWindow, append_log, plot_loss, progress_line, read_log
from difflab.train.sharding import ShardedEMA, full, full_copy, local, to_dtensors
from difflab.train.tasks import Task
from difflab.train.tasks.frozen import check_unchanged, freeze

STEP_STREAM, SAMPLE_STREAM = 0, 2  # derive_seed(seed, stream, ...): independent streams of draws
# what `Trainer.load_state_dict` reads: a checkpoint lacking one of them cannot be resumed
STATE_KEYS = ("step", "data", "config", "model", "ema", "optimizer", "scheduler", "task", "rng", "log_window")


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf (the update was not applied), or a weight did after
    the update; either way nothing of that step is saved or exported."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written first."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint {checkpoint}")


def seed_everything(seed: int) -> None:
    """Seed the global RNGs that layers such as dropout draw from."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def warmup_factor(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


class Trainer:
    """Owns what changes during training (weights, EMA, optimizer, step, log window) and
    writes the run folder; `state_dict()` is exactly what a checkpoint holds. The task's
    frozen modules are put on the device and fingerprinted here, never trained or saved."""

    def __init__(self, task: Task, dataset, config: Config, run_dir: str | Path, dist: Dist | None = None):
        cfg = config.train
        self.task, self.dataset, self.config, self.cfg = task, dataset, config, cfg
        self.run_dir, self.dist = Path(run_dir), dist or Dist()
        self.device = self.dist.device
        self.model = task.model.to(self.device)
        # the task's frozen modules, on the device; what a checkpoint records: name -> source, fingerprint
        self.frozen_records = freeze(getattr(task, "frozen", {}), self.model, self.device)
        self.after_step = getattr(task, "after_step", None)
        if self.dist.sharded:
            if self.after_step is not None:
                raise ValueError(
                    f"train.parallel = 'fsdp' does not support the {type(task).__name__} task yet (its after_step "
                    "works on whole weights); use train.parallel = 'ddp'"
                )
            self.template = copy.deepcopy(self.model)  # unsharded, for the sample grid and the export
            self.wrapped = self.dist.wrap(self.model)  # the model itself, sharded in place
            ema = ShardedEMA(self.model, self.template, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
        else:
            ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
            self.wrapped = self.dist.wrap(self.model)
        self.ema = ema
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_factor(cfg.warmup_steps))
        self.schedule = ShardSchedule(len(dataset), cfg.batch_size, cfg.accumulate, self.dist.world_size, cfg.seed)
        self.generator = torch.Generator()
        self.window = LogWindow()
        self.records: list[dict] = []  # log lines so far, for the loss curve
        self.step = 0
        self.saved_step: int | None = None
        self.stop_signal: int | None = None  # set by the signal handler of this process
        self.stop_agreed = False
        self.autocast = self._autocast(cfg.precision)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "data": {**self.schedule.position(self.step), "dataset_size": len(self.dataset)},
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "task": self.task.extra_state(),
            "frozen": self.frozen_records,
            "rng": capture_rng(),
            "log_window": self.window.state_dict(),
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["data"]["dataset_size"] != len(self.dataset):
            raise ValueError(
                f"the checkpoint was trained on {state['data']['dataset_size']} examples but the data set now has "
                f"{len(self.dataset)}; resuming would not continue the same run"
            )
        check_unchanged(state.get("frozen", {}), self.frozen_records)  # checkpoints before frozen modules: none
        if self.dist.sharded:
            state = to_dtensors(state, self.dist.mesh)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.task.load_extra_state(state["task"])
        restore_rng(state["rng"])
        self.window.load_state_dict(state["log_window"])
        self.step = self.saved_step = int(state["step"])
        self.records = [r for r in read_log(self.run_dir) if r.get("step", 0) <= self.step]

    def save(self) -> Path | None:
        """Rank 0 writes the checkpoint of the current step (under FSDP each process adds its
        shards); every rank waits for it."""
        path, keep = None, self.cfg.keep_checkpoints
        if self.dist.sharded:
            d = self.dist
            path = save_sharded_checkpoint(
                self.run_dir, self.step, self.state_dict(), d.rank, d.world_size, d.barrier, keep
            )
        elif self.dist.is_main:
            path = save_checkpoint(self.run_dir, self.step, self.state_dict(), keep=keep)
        self.saved_step = self.step
        self.dist.barrier()
        return path

    # ---------------------------------------------------------------- one step
    def _autocast(self, precision: str):
        if precision != "bf16":
            return contextlib.nullcontext
        kind = self.device.type
        available = getattr(torch.amp, "is_autocast_available", lambda k: k in ("cpu", "cuda"))
        supported = available(kind) and (kind != "cuda" or torch.cuda.is_bf16_supported())
        if not supported:
            warnings.warn(f"bf16 autocast is not supported on {self.device}; training in fp32", stacklevel=2)
            return contextlib.nullcontext
        slow = slow_dtype_reason(self.device, torch.bfloat16, "training")
        if slow:
            warnings.warn(f"{slow}; training in fp32 instead", stacklevel=2)
            return contextlib.nullcontext
        return lambda: torch.autocast(kind, dtype=torch.bfloat16)

    def train_step(self, batches) -> dict[str, float]:
        """Forward/backward over the accumulation micro-batches, then one optimizer update.
        Returns the step's statistics averaged over all processes."""
        acc, world, rank = self.cfg.accumulate, self.dist.world_size, self.dist.rank
        self.optimizer.zero_grad(set_to_none=True)
        self.task.step = self.step
        totals: dict[str, torch.Tensor] = {}
        for k in range(acc):
            batch = {key: v.to(self.device) if torch.is_tensor(v) else v for key, v in next(batches).items()}
            shard_seed = derive_seed(self.cfg.seed, STEP_STREAM, self.step, k * world + rank)
            self.generator.manual_seed(shard_seed)
            seed_everything(shard_seed)
            # gradients are reduced across processes once, on the last micro-batch
            with self.dist.gradient_sync(self.wrapped, enabled=k == acc - 1):
                with self.autocast():
                    losses, logs = self.task.loss(self.wrapped, batch, self.generator)
                loss = losses.float().mean()
                (loss / acc).backward()
            for key, value in {"loss": loss, **logs}.items():
                totals[key] = totals.get(key, 0.0) + value.detach().float() / acc
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = full(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        keys = sorted(totals)
        stop = float(self.stop_signal is not None)
        packed = torch.stack([totals[k] for k in keys] + [grad_norm.float(), torch.tensor(stop, device=self.device)])
        packed = self.dist.mean(packed.to(self.device)).tolist()
        stats = dict(zip(keys, packed[: len(keys)]))
        stats["grad_norm"] = packed[len(keys)]
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            last = latest_checkpoint(self.run_dir)
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: loss = {stats['loss']}, grad norm = {stats['grad_norm']}; "
                f"the update was not applied. Last good checkpoint: {last or 'none'}"
            )
        # every process stops at the same step: the first one where any process had been signalled
        self.stop_agreed = packed[-1] > 0
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self._check_weights(stats["lr"])
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(self.model, self.step)
        return stats

    def _check_weights(self, lr: float) -> None:
        """After the update: a weight that is not finite (an overflowing learning rate, a damaged
        optimizer state) stops the run before anything of this step is saved or exported."""
        named = list(self.model.named_parameters())
        finite = torch.stack([torch.isfinite(local(p).detach()).all() for _, p in named])
        if self.dist.sharded:  # each process sees its own shards: a weight is finite where all agree
            finite = self.dist.mean(finite.float()) == 1.0
        if not bool(finite.all()):
            name = named[int((~finite).nonzero()[0])][0]
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: the weight {name!r} is not finite (NaN or inf) after "
                f"the optimizer update (lr = {lr:g}); nothing of this step was saved. "
                f"Last good checkpoint: {latest_checkpoint(self.run_dir) or 'none'}"
            )

    # ---------------------------------------------------------------- the loop
    def fit(self) -> None:
        """Train until `train.steps`; raises TrainingDiverged or TrainingInterrupted."""
        cfg = self.cfg
        batches = self.batches()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=None if self.dist.is_main else True, desc="train")
        self.model.train()
        started, start_step = time.perf_counter(), self.step
        earlier = self.records[-1].get("train_s", 0.0) if self.records else 0.0  # before a resume
        try:
            with self._catch_signals():
                while self.step < cfg.steps:
                    stats = self.train_step(batches)
                    self.window.add(stats)
                    bar.update(1)
                    final = self.step == cfg.steps
                    if self.step % cfg.log_every == 0 or final:
                        seconds = time.perf_counter() - started
                        rate = (self.step - start_step) / seconds
                        record = {"step": self.step, **self.window.means(), "it_s": rate, "train_s": earlier + seconds}
                        self._log(record, bar)
                    if self.step % cfg.log_every == 0:  # a final partial window is logged but kept,
                        self.window.reset()  # so extending a finished run logs what one long run would
                    if final or (cfg.sample_every and self.step % cfg.sample_every == 0):
                        self._pictures()
                    if final or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self.save()
                    if self.stop_agreed and not final:
                        path = self.save() if self.saved_step != self.step else latest_checkpoint(self.run_dir)
                        raise TrainingInterrupted(self.stop_signal or signal.SIGTERM, self.step, path)
        finally:
            bar.close()
            del batches  # shuts down DataLoader workers

    def batches(self):
        """This process's micro-batches from the current step to the end of training."""
        loader = DataLoader(
            self.dataset,
            batch_sampler=ShardSampler(self.schedule, self.dist.rank, self.step, self.cfg.steps),
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _log(self, record: dict, bar) -> None:
        self.records.append(record)
        if self.dist.is_main:
            append_log(self.run_dir, record)
            bar.set_postfix(loss=f"{record['loss']:.4g}")
            if not _is_terminal(sys.stdout):  # tqdm shows nothing there: `nohup difflab train > log`
                print(progress_line(record, self.cfg.steps), flush=True)

    def sampling_model(self) -> torch.nn.Module:
        """The network to sample from and export: the EMA's if there is one. Under FSDP a whole
        copy is gathered, so every process must call it."""
        if self.dist.sharded:
            return self.ema.gathered() if self.ema is not None else full_copy(self.model.state_dict(), self.template)
        return self.ema.model if self.ema is not None else self.model

    def _pictures(self) -> None:
        """The loss curve and a grid of samples from fixed noise (comparable across steps)."""
        model = self.sampling_model() if self.cfg.sample_every else None  # collective under FSDP
        if not self.dist.is_main:
            return
        plot_loss(self.records, self.run_dir / "loss.png")
        if model is None:
            return
        from difflab.viz import save_samples

        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, SAMPLE_STREAM))
        images = self.task.sample_images(model, self.config.sample.n, generator)
        model.train(was_training)
        if images is not None:
            save_samples(images.float().cpu(), self.run_dir / "samples" / f"step-{self.step:07d}.png")

    @contextlib.contextmanager
    def _catch_signals(self):
        """SIGINT/SIGTERM set a flag; the loop saves and stops at the end of the step. A second
        signal gets the previous handler (Ctrl-C twice stops at once)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.stop_signal = signum
            for s, h in previous.items():
                signal.signal(s, h)

        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
