"""Train one variant and yield one result per epoch. Knows nothing of Optuna or MLflow.

    trainer = Trainer(variant, dataset, TrainConfig(...), device=resolve_device("auto"))
    for result in trainer.epochs():
        print(result.metrics())          # train/val loss and accuracy, speed, peak memory
    trainer.column_accuracies()          # {1: acc of column 1 alone, ...} (anytime property)
    trainer.anytime(0.9)                 # ... plus confidence-halted inference (anytime.py)

Same seed, same machine, same thread count: identical epoch results on the CPU.

`training.compile` (default none) compiles the model for the training step with torch.compile
(`reduce-overhead`: plus CUDA graphs), over the static-shape drop-path (static_drop_path.py);
evaluation runs the same weights eagerly.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fractal_mlops.config.sections import TrainConfig
from fractal_mlops.engine.anytime import (
    ColumnOutputs,
    HaltingPoint,
    anytime_curve,
    collect,
    column_flops,
    curve_csv,
    halting_point,
)
from fractal_mlops.engine.cost import inference_cost
from fractal_mlops.engine.data import Dataset, DeviceLoader
from fractal_mlops.engine.device import PeakMemory
from fractal_mlops.engine.model import FractalNet, build_model, drop_rng, param_count
from fractal_mlops.engine.precision import Precision, fixed

EVAL_BATCH = 512
CHECK_EVERY = 16  # training steps between looks at the non-finite flag (each look: one sync)


@dataclass(frozen=True)
class TrainPass:
    loss: float  # mean over the steps (fp16: over those whose loss was finite)
    accuracy: float
    seen: int
    non_finite_step: int | None  # the step whose loss was not finite (the pass stopped there)
    trained: int  # images trained in this call (fewer than `seen` in a resumed epoch)
    skipped_steps: int | None  # fp16 only: steps GradScaler skipped for overflow


@dataclass(frozen=True)
class _EpochSoFar:
    """An epoch's progress when a checkpoint was taken inside it: steps done, running sums."""

    step: int = 0
    loss_sum: float = 0.0
    counted: int = 0
    correct: int = 0
    skipped: int = 0
    first_bad: int = -1
    seen: int = 0


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    epoch_seconds: float
    images_per_second: float
    host_mem_peak_mb: float
    # only when training on CUDA: the training pass's peak allocation (before evaluation), the
    # most the caching allocator held meanwhile (what other workers on the GPU cannot use),
    # and evaluation's peak allocation
    gpu_mem_peak_mb: float | None = None
    gpu_mem_reserved_mb: float | None = None
    gpu_eval_mem_peak_mb: float | None = None
    amp_skipped_steps: float | None = None  # fp16 only: steps GradScaler skipped for overflow
    stop_reason: str | None = None  # training cannot go on (a non-finite loss)

    def metrics(self) -> dict[str, float]:
        """The per-epoch metrics under their MLflow names (gpu_* only on CUDA)."""
        values = asdict(self)
        for key in ("epoch", "stop_reason"):
            values.pop(key)
        return {k: float(v) for k, v in values.items() if v is not None}


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    drop_rng.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: nn.Module, settings: TrainConfig, fused: bool
                    ) -> torch.optim.Optimizer:
    """SGD or AdamW. `fused` (on CUDA): one launch per step, and GradScaler hands the step its
    overflow flag on the device instead of reading it back (a host sync per step).

    A fused SGD step that GradScaler skips for overflow writes nothing, not even the momentum
    buffers that a first step creates with torch.empty_like: a skipped first step (fp16 often
    starts with a few) left them holding whatever that memory held, and momentum carried it
    into the weights. So they start at zero, which the first step taken turns into its
    gradient, as an unfused first step does."""
    s = settings
    if s.optimizer == "adamw":  # its state starts at zero, and its step count skips too
        return torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay,
                                 fused=fused or None)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                                weight_decay=s.weight_decay, fused=fused or None)
    if fused and s.momentum:
        for parameter in model.parameters():
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return optimizer


class Trainer:
    def __init__(self, variant: dict, data: Dataset, settings: TrainConfig,
                 device: torch.device | str = "cpu", flip: bool = False,
                 static_drop_path: bool | None = None, precision: Precision | None = None) -> None:
        """`static_drop_path`: the masked drop-path form; default: when compiling. `precision`:
        the autocast dtype and memory format (default: the config's, amp auto by rule; a
        study measures them, autotune.py)."""
        self.device = torch.device(device)
        self.settings = settings
        self.precision = precision or fixed(settings, self.device)
        self.amp_dtype = self.precision.amp_dtype
        seed_everything(settings.seed, self.device)
        channels_last = self.precision.channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model: FractalNet = build_model(
            {k: v for k, v in variant.items() if k != "name"}, data.num_classes, data.in_chans,
            grad_checkpointing=settings.grad_checkpointing, name=variant.get("name"),
            static_drop_path=(settings.compile != "none" if static_drop_path is None
                              else static_drop_path),
        ).to(self.device, memory_format=memory_format)
        self.step_model = self._compiled(self.model)
        self.param_count = param_count(self.model)
        self.optimizer = build_optimizer(self.model, settings, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        loader = dict(mean=data.mean, std=data.std, device=self.device,
                      channels_last=channels_last)
        self.train_loader = DeviceLoader(data.train_x, data.train_y, settings.batch_size,
                                         shuffle=True, flip=flip, seed=settings.seed, **loader)
        self.val_loader = DeviceLoader(data.val_x, data.val_y, EVAL_BATCH, **loader)
        self.loss_fn = nn.CrossEntropyLoss()
        self.memory = PeakMemory(self.device)
        self.train_seconds = 0.0
        self.epochs_done = 0
        # Within an epoch, `on_checkpoint(state_dict())` at most every `checkpoint_seconds`
        self.checkpoint_seconds: float | None = None
        self.on_checkpoint: Callable[[dict], None] | None = None
        self._resume: _EpochSoFar | None = None  # an epoch to finish (load_state_dict)

    def _compiled(self, model: nn.Module) -> nn.Module:
        """The module the training step calls: the model, or its compiled form (same
        parameters). One graph per batch shape (dynamic=False): the full batches and the last,
        smaller one, each captured once."""
        if self.settings.compile == "none":
            return model
        # A worker trains trial after trial in one process: without a reset, the compiled
        # graphs of earlier models pile up until dynamo's recompile limit and it runs eagerly.
        torch.compiler.reset()
        return torch.compile(model, mode=self.settings.compile, dynamic=False)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_epoch(self) -> TrainPass:
        """One pass over the training set (or the rest of one a checkpoint was taken in). A
        non-finite loss ends it (within CHECK_EVERY steps of the step it happened at, which it
        names); with fp16, a step GradScaler skips for overflow is counted and left out of the
        mean loss instead."""
        self.model.train()
        so_far, self._resume = self._resume or _EpochSoFar(), None
        tensor = lambda value, dtype: torch.tensor(value, device=self.device, dtype=dtype)  # noqa: E731
        loss_sum, counted = tensor(so_far.loss_sum, torch.float32), tensor(so_far.counted, torch.int64)
        correct, skipped = tensor(so_far.correct, torch.int64), tensor(so_far.skipped, torch.int64)
        first_bad = tensor(so_far.first_bad, torch.int64)  # the first non-finite loss' step, or -1
        seen, saved_at = so_far.seen, time.monotonic()
        steps = len(self.train_loader)
        for step, (images, labels) in enumerate(self.train_loader.batches(so_far.step),
                                                so_far.step + 1):
            loss, logits, was_skipped = self.train_step(images, labels)
            finite = torch.isfinite(loss)
            if was_skipped is None:
                loss_sum += loss * len(labels)
                counted += len(labels)
            else:  # GradScaler skips a step that overflowed: its loss is not a divergence
                skipped += was_skipped
                loss_sum += torch.where(finite, loss, 0.0) * len(labels)
                counted += finite * len(labels)
                finite = finite | was_skipped
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if step % CHECK_EVERY == 0 and first_bad.item() >= 0:  # one look per CHECK_EVERY
                break
            if (self.on_checkpoint is not None and self.checkpoint_seconds and step < steps
                    and time.monotonic() - saved_at >= self.checkpoint_seconds):
                self.on_checkpoint(self.state_dict(_EpochSoFar(
                    step, loss_sum.item(), int(counted.item()), int(correct.item()),
                    int(skipped.item()), int(first_bad.item()), seen)))
                saved_at = time.monotonic()
        bad = int(first_bad.item())
        return TrainPass(loss_sum.item() / max(int(counted.item()), 1), correct.item() / seen,
                         seen, bad if bad >= 0 else None, seen - so_far.seen,
                         int(skipped.item()) if self.scaler is not None else None)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One optimizer step: (loss, logits) detached, and with fp16 whether GradScaler
        skipped the step for overflow (a device bool). Reads nothing back from the device (no
        .item(), .tolist(), .cpu()), so the host queues steps ahead of a GPU."""
        if self.settings.compile == "reduce-overhead":  # a new step: CUDA graphs may reuse
            torch.compiler.cudagraph_mark_step_begin()  # the last step's output memory
        with self._autocast():
            logits = self.step_model(images)
            loss = self.loss_fn(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
            return loss.detach(), logits.detach(), None
        self.scaler.scale(loss).backward()
        scale = self.scaler._scale.clone()  # GradScaler halves its scale when it skips a step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), logits.detach(), self.scaler._scale < scale

    @torch.no_grad()
    def evaluate(self, column: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) on the validation set; `column=k` runs column k alone."""
        self.model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in self.val_loader:
            with self._autocast():
                logits = self.model(images, column=column).float()
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        return loss_sum / seen, correct / seen

    def state_dict(self, so_far: _EpochSoFar | None = None) -> dict:
        """Everything the next step depends on: weights, optimizer, RNG streams, epoch, and
        within an epoch (`so_far`) its step and running sums. A trial continued from it trains
        what an unbroken one would have."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "epochs_done": self.epochs_done, "train_seconds": self.train_seconds,
                 "loader_epoch": self.train_loader.epoch, "torch_rng": torch.get_rng_state(),
                 "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
                 "drop_rng": drop_rng.getstate()}
        if so_far is not None:
            # the loader has started this epoch: it starts it again and skips the steps done
            state.update(epoch_so_far=asdict(so_far), loader_epoch=self.train_loader.epoch - 1)
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the next steps equal those of an unbroken run."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epochs_done = state["epochs_done"]
        self.train_seconds = state["train_seconds"]
        self.train_loader.epoch = state["loader_epoch"]
        self._resume = _EpochSoFar(**state["epoch_so_far"]) if "epoch_so_far" in state else None
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        if "drop_rng" in state:
            drop_rng.setstate(state["drop_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    def epochs(self, stop: int | None = None) -> Iterator[EpochResult]:
        """Epochs after those already done, up to `stop` (default: training.epochs)."""
        last = self.settings.epochs if stop is None else min(stop, self.settings.epochs)
        for epoch in range(self.epochs_done + 1, last + 1):
            self.memory.reset()
            start = time.perf_counter()
            trained = self.train_epoch()
            train_loss, train_acc = trained.loss, trained.accuracy
            self._sync()
            train_time = time.perf_counter() - start
            gpu_peak, gpu_reserved = self.memory.gpu_mb()
            val_loss, val_acc = self.evaluate()
            gpu_eval_peak, _ = self.memory.gpu_mb()
            seconds = time.perf_counter() - start
            self.train_seconds += seconds
            self.epochs_done = epoch
            stop = None
            if trained.non_finite_step is not None:
                stop = (f"non-finite train loss at epoch {epoch}, step "
                        f"{trained.non_finite_step}")
            elif not np.isfinite(val_loss):
                stop = f"non-finite validation loss at epoch {epoch}"
            yield EpochResult(epoch, train_loss, train_acc, val_loss, val_acc, seconds,
                              trained.trained / train_time, self.memory.host_mb(), gpu_peak, gpu_reserved,
                              gpu_eval_peak, trained.skipped_steps, stop)
            if stop:
                return

    @torch.no_grad()
    def column_outputs(self) -> ColumnOutputs:
        """Each column's answer alone on every validation image (the anytime property)."""
        self.model.eval()
        logits: list[list[torch.Tensor]] = [[] for _ in range(self.model.columns)]
        labels = []
        for images, batch_labels in self.val_loader:
            for column in range(1, self.model.columns + 1):
                with self._autocast():
                    logits[column - 1].append(self.model(images, column=column).float())
            labels.append(batch_labels)
        return collect([torch.cat(chunks) for chunks in logits], torch.cat(labels))

    def column_accuracies(self) -> dict[int, float]:
        """Validation accuracy of each column alone (the anytime property)."""
        outputs = self.column_outputs()
        return {k: outputs.accuracy(k) for k in range(1, outputs.columns + 1)}

    def anytime(self, threshold: float) -> tuple[dict[int, float], HaltingPoint, str]:
        """Column accuracies, the halting point at `threshold`, and the curve as CSV text."""
        outputs = self.column_outputs()
        flops = column_flops(self.model, tuple(self.val_loader.x.shape[1:]))
        accuracies = {k: outputs.accuracy(k) for k in range(1, outputs.columns + 1)}
        return (accuracies, halting_point(outputs, flops, threshold),
                curve_csv(anytime_curve(outputs, flops, threshold)))

    def inference_cost(self) -> dict[str, float]:
        """flops, latency_ms and throughput_img_s of the model as trained (engine/cost.py)."""
        return inference_cost(self.model, tuple(self.val_loader.x.shape[1:]), self.device,
                              self._autocast, self.precision.channels_last)
