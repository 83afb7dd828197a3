"""How a trainer's recipe is executed: devices, mixed precision, DDP, the epoch loop, checkpoints, resume.

Reproducibility rests on one rule of the loader: batch ``i`` of epoch ``e`` is a pure function of
(seed, rank, e, i). A checkpoint therefore only needs the position (epoch, iteration), the tensors and
torch's random state to continue exactly, also from the middle of an epoch after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg.errors import TrainingInterrupted
from autoseg.training.distributed import DistributedContext, choose_device
from autoseg.training.progress import (
    EpochRecord,
    moving_average,
    plot_progress,
    write_log,
)
from autoseg.training.record import write_model_files, write_run_json
from autoseg.training.resume import Position, prepare_output, save
from autoseg.training.trainer import Trainer


class _SigtermGate:
    """SIGTERM (a scheduler's kill) is handled like Ctrl-C, so the latest state is saved first.

    Inside ``deferred()`` a SIGTERM only marks itself, and the KeyboardInterrupt is raised when the block
    ends: an interrupt raised inside matplotlib's drawing of progress.png came out as "ValueError: Invalid
    bounding box" and exit 1, with no state saved (seen in CI).
    """

    def __init__(self) -> None:
        self.deferring = False
        self.pending = False

    def handler(self, signum: int, frame: object) -> None:
        if self.deferring:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.pending = False
        try:
            previous = signal.signal(signal.SIGTERM, self.handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


_SIGTERM = _SigtermGate()


def _precision(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether a gradient scaler is needed)."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


class Run:
    """One fold's training: owns the network, optimiser, data and files while ``fit`` runs."""

    def __init__(self, trainer: Trainer) -> None:
        from autoseg.augment.pipeline import spatial_setup
        from autoseg.losses import DeepSupervisionLoss, deep_supervision_weights

        self.trainer = trainer
        self.setup = trainer.setup
        self.options = trainer.options
        self.out = self.setup.output_dir
        self.dist = DistributedContext.from_environment()
        self.device = choose_device(self.options.device, self.dist)
        self.dist.start(self.device)
        self.main = self.dist.is_main
        self.autocast_dtype, needs_scaler = _precision(self.device)
        self.scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        torch.manual_seed(self.options.seed)
        self.network = trainer.build_network().to(self.device)
        # --pretrained: loaded before the optimiser sees the weights; a resumed run's checkpoint holds them.
        resuming = self.options.resume and (self.out / "checkpoint_latest.pt").is_file()
        self.pretrained = None if resuming else trainer.load_pretrained(self.network)
        if self.pretrained is not None and self.main:
            print(f"autoseg: {self.pretrained['summary']}")
        self.ds_weights = deep_supervision_weights(self._count_outputs())
        if hasattr(self.network, "num_outputs"):  # compute no head whose loss weight is zero
            setattr(self.network, "num_outputs", sum(1 for w in self.ds_weights if w > 0))  # noqa: B010
        self.loss = DeepSupervisionLoss(trainer.build_loss(), self.ds_weights)
        self.optimizer = trainer.build_optimizer(self.network)
        self.schedule = trainer.build_schedule()
        self.model: nn.Module = self.network
        if self.dist.enabled:
            self._freeze_unused_parameters()
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                self.network, device_ids=ids, find_unused_parameters=trainer.ddp_find_unused_parameters
            )
        self.compile = _should_compile(self.options.compile, self.device, self.main)
        self.cuda_graphs = self.options.cuda_graphs and self.compile and self.device.type == "cuda"
        if self.options.cuda_graphs and not self.cuda_graphs and self.main:
            print("autoseg: --cuda-graphs needs a CUDA device and torch.compile; training without CUDA graphs")
        if self.compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.model = torch.compile(self.model, mode=mode)  # type: ignore[assignment]

        self.params = trainer.epoch_augmentations(0)
        self.trainer_notes = trainer.notes()
        if self.main:
            for key, value in self.trainer_notes.items():
                if isinstance(value, str):
                    print(f"autoseg: {self.setup.trainer_name}: {key} {value}")
        self.spatial = spatial_setup(self.setup.configuration.patch_size, self.params)
        self.augmentation_phases: list[tuple[int, Any]] = []  # (first epoch, params) of a schedule
        self.train_case_probabilities: dict[str, float] | None = None  # Trainer.case_weights; None: uniform
        # where the augmentation runs; _loaders may fall back to "cpu" (augmentation_note says why)
        self.augmentation_device = self.options.augmentation or ("device" if self.device.type == "cuda" else "cpu")
        self.augmentation_note: str | None = None
        self.cases_on_device = False  # _loaders decides (autoseg.data.resident)
        self.cases_on_device_note: str | None = None
        self.position = Position()
        self.compile_seconds: float | None = None

    # -- set-up helpers ----------------------------------------------------------------------------------
    def _count_outputs(self) -> int:
        """How many outputs the network gives in training mode (1 without deep supervision)."""
        if not self.trainer.deep_supervision:
            return 1
        if hasattr(self.network, "max_outputs"):
            return int(getattr(self.network, "max_outputs"))  # noqa: B009
        return self.setup.configuration.network.num_stages - 1  # one head per decoder stage

    def _freeze_unused_parameters(self) -> None:
        """DDP refuses parameters that get no gradient, such as the head of an output the loss skips."""
        divisible = self.setup.configuration.network.shape_must_be_divisible_by
        probe = torch.zeros((1, self.trainer.num_input_channels, *(2 * d for d in divisible)), device=self.device)
        outputs = self.network(probe)
        outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
        torch.stack([o.float().sum() for o in outputs]).sum().backward()
        for parameter in self.network.parameters():
            if parameter.grad is None:
                parameter.requires_grad_(False)
            parameter.grad = None

    def _folds(self) -> tuple[list[str], list[str]]:
        from autoseg.data.splits import fold_cases, load_or_create_splits

        splits = load_or_create_splits(self.setup.splits_file, self.setup.case_ids)
        return fold_cases(splits, self.setup.fold, self.setup.splits_file)

    def _loaders(self, train_ids: list[str], val_ids: list[str]) -> tuple[Any, Any]:
        from autoseg.augment.pipeline import EpochAugmenters, validation_augmenter
        from autoseg.data.cases import PreprocessedCases
        from autoseg.data.device_batches import DeviceBatches
        from autoseg.data.loader import BatchLoader
        from autoseg.data.sampling import PatchSampler

        conf = self.setup.configuration
        batch = self.dist.share_batch(self.trainer.batch_size)
        foreground = self.setup.plan.foreground_labels
        workers = self.options.num_workers
        if workers is None:
            from autoseg.parallel import available_cores

            workers = max(available_cores() // self.dist.world_size, 1)
        self.num_workers = workers
        pin = self.device.type == "cuda"
        # float16/int8 on the way to a GPU whose step reads its input in reduced precision anyway
        compact = pin and self.autocast_dtype is not None
        cases = PreprocessedCases(self.setup.data_dir, sorted(set(train_ids) | set(val_ids)))
        train_sampler = PatchSampler(
            cases, train_ids, conf.patch_size, self.spatial.sample_size, batch,
            self.trainer.oversample_foreground, foreground, self.trainer.case_weights(train_ids),
        )  # fmt: skip
        probabilities = train_sampler.case_probabilities
        if probabilities is not None:
            self.train_case_probabilities = {c: round(float(p), 6) for c, p in zip(train_ids, probabilities)}
        val_sampler = PatchSampler(
            cases, val_ids, conf.patch_size, conf.patch_size, batch, self.trainer.oversample_foreground, foreground
        )
        by_epoch = [self.trainer.epoch_augmentations(e) for e in range(self.trainer.num_epochs)]
        device_augmenters = self._device_augmenters(by_epoch)
        if device_augmenters is not None:  # the workers only cut samples; the device augments them
            phases = device_augmenters.phases
            worker_aug: Any = validation_augmenter()
        else:
            cpu_augmenters = EpochAugmenters.build(conf.patch_size, by_epoch)
            phases, worker_aug = cpu_augmenters.phases, cpu_augmenters
        self.augmentation_phases = [(first, params) for first, params, _ in phases]
        val_aug = validation_augmenter()
        seed, rank = self.options.seed, self.dist.rank
        # Validation batches get their own stream: the same seed with a different rank tag.
        resident = self._resident_cases(cases, train_ids + val_ids, compact, device_augmenters is not None)
        if resident is not None:
            from autoseg.data.resident import ResidentLoader

            self.num_workers = 0
            train: Any = ResidentLoader(train_sampler, resident, self.trainer.num_iterations, seed, rank)
            val: Any = ResidentLoader(val_sampler, resident, self.trainer.num_val_iterations, seed + 1, rank)
        else:
            train = BatchLoader(
                train_sampler, worker_aug, self.trainer.num_iterations, workers, seed, rank, pin, compact=compact
            )
            val_workers = workers // 2
            val = BatchLoader(
                val_sampler, val_aug, self.trainer.num_val_iterations, val_workers, seed + 1, rank, pin, compact=compact
            )
        return (
            DeviceBatches(train, self.device, device_augmenters, seed, rank),
            DeviceBatches(val, self.device),
        )

    def _resident_cases(self, cases: Any, case_ids: list[str], compact: bool, device_augmentation: bool) -> Any:
        """The fold's cases on the device (``autoseg.data.resident``), or None for worker processes; with
        ``--cases-on-device auto`` only on CUDA, with device augmentation, within a quarter of the free memory."""
        from autoseg.data.resident import AUTO_SHARE, ResidentCases, resident_bytes

        choice = self.options.cases_on_device or "auto"
        if choice == "never":
            return None
        if not device_augmentation:
            if choice == "always":
                self.cases_on_device_note = "the augmentation runs on the CPU, so its workers cut the samples"
                if self.main:
                    print(f"autoseg: --cases-on-device always ignored: {self.cases_on_device_note}")
            return None
        if choice == "auto":
            if self.device.type != "cuda":
                return None
            needed = resident_bytes(cases, case_ids, compact)
            free, _ = torch.cuda.mem_get_info(self.device)
            if needed > AUTO_SHARE * free:
                self.cases_on_device_note = (
                    f"the cases need {needed / 2**30:.1f} GiB, more than a quarter of the"
                    f" {free / 2**30:.1f} GiB free on the device; batches come from worker processes"
                )
                return None
        resident = ResidentCases(cases, case_ids, self.device, compact)
        self.cases_on_device = True
        return resident

    def _device_augmenters(self, by_epoch: list[Any]) -> Any:
        """The device twins of every augmentation phase, or None to augment on the CPU (``augmentation_note``
        says why when device augmentation was asked for but cannot run)."""
        if self.augmentation_device != "device":
            return None
        from autoseg.augment.device import DeviceAugmenter, unsupported
        from autoseg.augment.pipeline import EpochAugmenters

        reasons = {reason for reason in map(unsupported, by_epoch) if reason}
        if reasons:
            self.augmentation_device = "cpu"
            self.augmentation_note = "; ".join(sorted(reasons))
            if self.main:
                print(f"autoseg: augmenting on the CPU instead of the device: {self.augmentation_note}")
            return None
        return EpochAugmenters.build(self.setup.configuration.patch_size, by_epoch, make=DeviceAugmenter)

    # -- the loop ----------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to_device(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # DeviceBatches already moved (and maybe augmented) the batch; this only covers direct callers
        image = batch["image"].to(self.device, non_blocking=True).float()
        label = batch["label"].to(self.device, non_blocking=True).long()
        return image, label

    def _mark_step(self) -> None:
        """With CUDA graphs, tell torch a new step begins: the previous step's graph outputs may be reused."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def train_step(self, batch: dict[str, Any]) -> torch.Tensor:
        image, label = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self._mark_step()
        with self._autocast():
            outputs = self.model(image)
            loss = self.loss(outputs, label)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.network.parameters(), self.trainer.grad_clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            nn.utils.clip_grad_norm_(self.network.parameters(), self.trainer.grad_clip_norm)
            self.optimizer.step()
        return loss.detach()

    def val_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        from autoseg.losses import tp_fp_fn

        image, label = self._to_device(batch)
        self._mark_step()
        with torch.no_grad(), self._autocast():
            outputs = self.model(image)
            loss = self.loss(outputs, label)
        full = outputs[0] if isinstance(outputs, list | tuple) else outputs
        counts = torch.stack(tp_fp_fn(full.argmax(1), label, self.trainer.num_classes))
        return loss.detach().float(), counts.float()

    def _set_lr(self, epoch: int) -> float:
        lr = self.schedule.lr(epoch, self.trainer.num_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int, loader: Any) -> float:
        from tqdm import tqdm

        pos = self.position
        self.model.train()
        total = self.trainer.num_iterations
        losses: list[torch.Tensor] = []
        shown = _LossReadout(self.device)
        bar = tqdm(
            total=total,
            initial=pos.iteration,
            desc=f"epoch {epoch}",
            unit="it",
            disable=not (self.main and self.options.show_progress),
            leave=False,
            dynamic_ncols=True,
        )
        try:
            for i, batch in enumerate(loader.epoch(epoch, start=pos.iteration), start=pos.iteration):
                first_compiled_step = self.compile and self.compile_seconds is None
                started = time.perf_counter()
                losses.append(self.train_step(batch))
                if first_compiled_step:  # the compilation's warm-up, reported apart from the epoch times
                    self.compile_seconds = time.perf_counter() - started
                pos.iteration = i + 1
                bar.update(1)
                if (i + 1) % 10 == 0:  # the shown loss is copied without blocking and read once it arrived
                    shown.request(torch.stack(losses[-10:]).mean())
                recent = shown.ready()
                if recent is not None:
                    bar.set_postfix(loss=f"{recent:.4f}")
        finally:
            # Kept on the position so that a checkpoint written after an interrupt (here or during the
            # validation that follows) holds every loss of the epoch so far.
            pos.partial_losses += [float(x) for x in torch.stack(losses).tolist()] if losses else []
            bar.close()
        total_and_count = self.dist.sum(
            torch.tensor([sum(pos.partial_losses), len(pos.partial_losses)], dtype=torch.float64)
        )
        return float(total_and_count[0]) / max(float(total_and_count[1]), 1.0)

    def validate_epoch(self, epoch: int, loader: Any) -> tuple[float, list[float | None]]:
        self.model.eval()
        losses, counts = [], None
        for batch in loader.epoch(epoch):
            loss, c = self.val_step(batch)
            losses.append(loss)
            counts = c if counts is None else counts + c
        assert counts is not None
        summed = self.dist.sum(torch.cat([torch.stack(losses).sum()[None], counts.flatten()]).double().cpu())
        n = len(losses) * self.dist.world_size
        val_loss = float(summed[0]) / n
        tp, fp, fn = summed[1:].view(3, -1)
        dice: list[float | None] = []
        for k in range(1, self.trainer.num_classes):
            denominator = float(2 * tp[k] + fp[k] + fn[k])
            dice.append(float(2 * tp[k]) / denominator if denominator > 0 else None)
        return val_loss, dice

    def end_epoch(self, epoch: int, train_loss: float, val_loss: float, dice: list[float | None], lr: float,
                  seconds: float) -> EpochRecord:  # fmt: skip
        pos = self.position
        present = [d for d in dice if d is not None]
        mean = sum(present) / len(present) if present else None
        pos.ema_pseudo_dice = moving_average(pos.ema_pseudo_dice, mean, self.trainer.pseudo_dice_momentum)
        new_best = pos.ema_pseudo_dice is not None and (
            pos.best_ema_pseudo_dice is None or pos.ema_pseudo_dice > pos.best_ema_pseudo_dice
        )
        if new_best:
            pos.best_ema_pseudo_dice = pos.ema_pseudo_dice
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            pseudo_dice=tuple(dice),
            mean_pseudo_dice=mean,
            ema_pseudo_dice=pos.ema_pseudo_dice,
            lr=lr,
            epoch_seconds=seconds,
            new_best=new_best,
        )
        pos.records.append(record)
        pos.epoch, pos.iteration, pos.partial_losses = epoch + 1, 0, []
        with _SIGTERM.deferred():  # the best checkpoint, the log and the plot are written whole
            if new_best:
                save(self, "checkpoint_best.pt")
            if self.main:
                write_log(self.out / "log.jsonl", pos.records)
                plot_progress(self.out / "progress.png", pos.records)
        if self.main and self.options.show_progress:
            from tqdm import tqdm

            tqdm.write(record.line())
        return record

    def train(self) -> None:
        with _SIGTERM.installed():
            self._train()

    def _train(self) -> None:
        _import_modules_used_later()
        train_ids, val_ids = self._folds()
        prepare_output(self)
        write_model_files(self)
        train_loader, val_loader = self._loaders(train_ids, val_ids)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        pos = self.position
        try:
            if pos.finished_epochs is None:
                write_run_json(self, "running", train_ids, val_ids, started=started)
                self._epochs(train_loader, val_loader)
                pos.finished_epochs = pos.epoch
                save(self, "checkpoint_final.pt")
                save(self, "checkpoint_latest.pt")
            elif self.main and self.options.show_progress:
                print(f"autoseg: {self.out} already trained {pos.finished_epochs} epochs")
        except KeyboardInterrupt:
            save(self, "checkpoint_latest.pt")
            write_run_json(self, "interrupted", train_ids, val_ids, started=started)
            raise TrainingInterrupted(
                f"training interrupted in epoch {pos.epoch} after {pos.iteration} iterations; the state is saved"
                f" in {self.out / 'checkpoint_latest.pt'}. Resume with the same command plus --resume"
            ) from None
        finally:
            train_loader.close()
            val_loader.close()
        summary = self.validate_whole_cases(val_ids)
        finished = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_run_json(
            self, "finished", train_ids, val_ids, started=started, finished=finished,
            validation_summary=str(summary) if summary else None,
        )  # fmt: skip

    def _epochs(self, train_loader: Any, val_loader: Any) -> None:
        pos = self.position
        reason = self.trainer.early_stopping_reason(pos.records) if pos.iteration == 0 else None
        if reason:  # resumed after its stopping rule was met (an early-stopped run, or a newly given patience)
            pos.stop_reason = reason
            return
        for epoch in range(pos.epoch, self.trainer.num_epochs):
            started = time.perf_counter()
            lr = self._set_lr(epoch)
            self.trainer.on_epoch_start(epoch)
            train_loss = self.train_epoch(epoch, train_loader)
            val_loss, dice = self.validate_epoch(epoch, val_loader)
            record = self.end_epoch(epoch, train_loss, val_loss, dice, lr, time.perf_counter() - started)
            reason = self.trainer.on_epoch_end(record) or self.trainer.early_stopping_reason(pos.records)
            if (epoch + 1) % self.trainer.checkpoint_every == 0 or self.options.fast_dev_run:
                save(self, "checkpoint_latest.pt")
            if reason:
                pos.stop_reason = reason
                break

    def validate_whole_cases(self, val_ids: list[str]) -> Path | None:
        """Predict the fold's held-out cases whole, in the original geometry, and score them."""
        from autoseg.training.validation import predict_and_evaluate

        self.dist.barrier()
        summary = None
        if self.main:
            ids = val_ids[:2] if self.options.fast_dev_run else val_ids
            summary = predict_and_evaluate(self, ids)
        self.dist.barrier()
        return summary


class _LossReadout:
    """The progress bar's loss without a host synchronisation inside the step loop.

    ``request`` queues a copy of a device scalar into pinned host memory behind the work already queued;
    ``ready`` returns the value once the copy has arrived (a CUDA event query, which never blocks), else
    None. On a CPU the copy is immediate.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host = torch.zeros((), dtype=torch.float32, pin_memory=self.cuda)
        self._event: Any = None
        self._pending = False

    def request(self, value: torch.Tensor) -> None:
        if self._pending:  # the previous copy has not arrived yet: skip this one rather than wait
            return
        self._host.copy_(value.detach().float(), non_blocking=self.cuda)
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._pending = True

    def ready(self) -> float | None:
        if not self._pending or (self._event is not None and not self._event.query()):
            return None
        self._pending = False
        return float(self._host)


def _should_compile(asked: bool | None, device: torch.device, verbose: bool) -> bool:
    """--compile / --no-compile, else on for CUDA where torch.compile's GPU backend (triton) is installed."""
    if asked is not None:
        return asked
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    if not has_triton():
        if verbose:
            print("autoseg: training without torch.compile: triton is not installed (pip install triton)")
        return False
    return True


def _import_modules_used_later() -> None:
    """Import now what the loop imports on first use (the progress plot, whole-case validation).

    SIGTERM raises KeyboardInterrupt wherever the main thread is. Inside the first import of a C extension
    (matplotlib's, on the first progress plot) the extension's initialisation turns it into "ImportError:
    initialization failed", and the interrupt became a crash without a checkpoint (seen in CI).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    import autoseg.evaluation.evaluate
    import autoseg.inference.export
    import autoseg.training.validation  # noqa: F401


def fit(trainer: Trainer) -> Path:
    run = Run(trainer)
    try:
        run.train()
    finally:
        run.dist.stop()
    return run.out
