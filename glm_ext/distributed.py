"""Training on several processes with PyTorch's own engine: small parts, applied to a model.

- :func:`init_distributed` joins the process group that ``torchrun`` describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or runs as a single
  process when launched without it; :func:`current_context` says where a process stands later on;
  :func:`backend_for` picks the collective backend from the device type (PyTorch's own table: gloo
  on the CPU, nccl on CUDA); :func:`close_distributed` tears down.
- :func:`apply_ddp` wraps a model in ``DistributedDataParallel``; :func:`apply_fsdp` shards it with
  FSDP2 (``fully_shard``: one unit per transformer layer, then the root).
- A step of ``K`` micro-batches (:mod:`glm_ext.data.steps` shares the rows out):
  :func:`gradient_sync` / :func:`micro_batches` skip the gradient reduction on all but the last one
  (``no_sync`` for DDP, ``set_requires_gradient_sync`` for FSDP2); :class:`StepLoss` averages the
  loss over the loss tokens of the whole step, across micro-batches and ranks;
  :func:`accumulate_gradients` strings these together; :func:`clip_grad_norm` clips gradients,
  sharded or not.
- Checkpoints: :func:`full_model_state_dict` gathers the whole model onto rank 0 (the
  ``glm_ext.checkpoint`` format's keys) and :func:`load_full_model_state_dict` loads one into a
  wrapped model; :func:`save_optimizer_state` / :func:`load_optimizer_state` write and read the
  optimizer with ``torch.distributed.checkpoint``: a directory holding one file per rank (its shard)
  and a ``.metadata`` file, readable by any world size.
- :func:`any_rank` tells every rank whether any rank raised a flag (a stop signal, say), so that
  all ranks stop after the same step; :func:`on_main_process` runs what only rank 0 does (taking a
  lock, writing a file) so that every rank learns its result, or that it failed
  (:class:`RankFailed`), instead of waiting forever for a rank that gave up.

The helpers work unchanged in a single process (no process group): wrappers are then not needed
and collectives are identities. Nothing here names a device type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from glm_ext.data.blank_infilling import BlankInfillingBatch
from glm_ext.data.collate import PackedBatch
from glm_ext.data.steps import batch_logits
from glm_ext.model import lm_loss
from glm_ext.progress import is_main_process  # the one notion of the main process (rank 0)

__all__ = [
    "DistributedContext",
    "StepLoss",
    "accumulate_gradients",
    "any_rank",
    "apply_ddp",
    "apply_fsdp",
    "backend_for",
    "clip_grad_norm",
    "RankFailed",
    "close_distributed",
    "current_context",
    "full_model_state_dict",
    "gradient_sync",
    "init_distributed",
    "is_main_process",
    "load_full_model_state_dict",
    "load_optimizer_state",
    "micro_batches",
    "on_main_process",
    "save_optimizer_state",
]

T = TypeVar("T")
LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# The process group


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its machine) and the
    device it computes on. ``world_size`` 1 without a process group is the single-process case."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device | str) -> str:
    """The collective backend for a device type: PyTorch's default (gloo on the CPU, nccl on CUDA)."""
    device_type = torch.device(device).type
    backends = dist.Backend.default_device_backend_map
    if device_type not in backends:
        raise ValueError(f"no collective backend for {device_type} devices (known: {', '.join(backends)})")
    return backends[device_type]


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"the environment sets WORLD_SIZE but not {name}: launch with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: torch.device | str) -> DistributedContext:
    """Joins the process group described by torchrun's environment, or returns the single-process
    context when ``WORLD_SIZE`` is not set.

    ``device`` is the device type to train on (``"cpu"``, ``"cuda"``, ...); an accelerator becomes
    the one numbered ``LOCAL_RANK`` and the current one. The backend comes from :func:`backend_for`.
    Joining twice is an error.
    """
    device = torch.device(device)
    if "WORLD_SIZE" not in os.environ:
        return DistributedContext(0, 0, 1, device)
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", default=rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, "
                         f"WORLD_SIZE={world_size}")
    if dist.is_initialized():
        raise RuntimeError("init_distributed: this process already belongs to a process group")
    if device.type != "cpu":
        device = torch.device(device.type, local_rank)
        torch.accelerator.set_device_index(local_rank)
    dist.init_process_group(
        backend=backend_for(device), rank=rank, world_size=world_size,
        device_id=device if device.type != "cpu" else None,
    )
    return current_context(device)


def current_context(device: torch.device | str) -> DistributedContext:
    """Where this process stands: in the process group it joined (:func:`init_distributed`; an
    accelerator ``device`` becomes the current one, numbered ``LOCAL_RANK``), or alone. A process
    that torchrun started with other ranks but that has not joined their group is an error (it
    would train alone and write the run directory beside them)."""
    device = torch.device(device)
    if not dist.is_initialized():
        world_size = _env_int("WORLD_SIZE", default=1)
        if world_size > 1:
            raise ValueError(f"torchrun started this process as one of WORLD_SIZE={world_size}, but it has not "
                             "joined their process group: call glm_ext.distributed.init_distributed first (glm-ext "
                             "train does)")
        return DistributedContext(0, 0, 1, device)
    if device.type != "cpu":
        device = torch.device(device.type, torch.accelerator.current_device_index())
    rank = dist.get_rank()
    return DistributedContext(rank, _env_int("LOCAL_RANK", default=rank), dist.get_world_size(), device)


def close_distributed() -> None:
    """Leaves the process group (nothing to do in a single process)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank when ``flag`` is True on any rank (a collective: all ranks must call it,
    e.g. after each step to agree to stop). ``device``: this rank's device."""
    if not dist.is_initialized():
        return bool(flag)
    raised = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(raised, op=dist.ReduceOp.MAX)
    return bool(raised.item())


class RankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed at something only it does (rank 0 raises, and
    reports, its own error)."""


def on_main_process(work: Callable[[], T]) -> T:
    """``work()`` run on rank 0 alone, its result (picklable) returned on every rank: a collective,
    every rank calls it and waits for rank 0. When ``work`` raises on rank 0, rank 0 raises that
    error and every other rank :class:`RankFailed` naming it. In a single process it just runs."""
    if not dist.is_initialized():
        return work()
    message: list[Any] = [None, None]  # (the error's description or None, the result)
    error = None
    if dist.get_rank() == 0:
        try:
            message[1] = work()
        except Exception as exc:  # told to the other ranks, then raised here
            error, message = exc, [f"{type(exc).__name__}: {exc}", None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RankFailed(f"rank 0 failed: {message[0]}")
    return message[1]


# --------------------------------------------------------------------------------------------
# Parallelism applied to a model


def apply_ddp(model: nn.Module, device: torch.device | str) -> DistributedDataParallel:
    """``model`` (on this rank's ``device``) wrapped in DistributedDataParallel: every rank holds all
    weights; gradients are averaged over ranks in the backward pass."""
    device = torch.device(device)
    return DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device])


def apply_fsdp(
    model: nn.Module, *, param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True
) -> nn.Module:
    """``model`` (a GLMModel) sharded in place with FSDP2: each transformer layer is one unit, the
    root (embeddings, final LayerNorm) another. Gradients are averaged over ranks.

    ``param_dtype``: bf16/fp16 computes in that dtype with gradients reduced in float32
    (``MixedPrecisionPolicy``; the sharded weights and the optimizer stay in their own dtype, e.g.
    float32); anything else (None, float32, float64) computes in the weights' dtype.
    """
    if param_dtype in LOW_PRECISION:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for layer in model.transformer.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward and backward passes inside reduce gradients over ranks only when ``enabled``;
    otherwise gradients accumulate locally (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``) until a pass with ``enabled``. No effect on a plain model."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def micro_batches(model: nn.Module, batches: Sequence[T]) -> Iterator[T]:
    """Yields the micro-batches of one step, each inside :func:`gradient_sync`: run its forward and
    backward in the loop body; gradients are reduced over ranks once, with the last one."""
    for index, batch in enumerate(batches):
        with gradient_sync(model, enabled=index == len(batches) - 1):
            yield batch


@dataclasses.dataclass(frozen=True)
class StepLoss:
    """The loss of a step of micro-batches on several ranks, as one batch of all their rows would
    give it: the sum of the per-token losses over the whole step divided by the step's loss-token
    count.

    Build it once per step with :meth:`for_step` (all-reduces the count before any backward); call
    it on each micro-batch's logits and backward what it returns. DDP and FSDP2 average gradients
    over ranks, so each rank's part is multiplied by ``world_size`` to make the average a sum.
    """

    tokens: torch.Tensor  # the step's loss tokens, all ranks (float64 scalar on the device)
    world_size: int

    @classmethod
    def for_step(cls, loss_masks: Iterable[torch.Tensor]) -> StepLoss:
        """From this rank's micro-batch loss masks (a collective: all ranks call it)."""
        masks = list(loss_masks)
        if not masks:
            raise ValueError("a step needs at least one micro-batch")
        count = torch.stack([mask.sum(dtype=torch.int64) for mask in masks]).sum()
        if dist.is_initialized():
            dist.all_reduce(count)
        return cls(count.to(torch.float64).clamp(min=1.0), _world_size())

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """This micro-batch's part of the step loss, scaled for backward on this rank."""
        return lm_loss(logits, targets, loss_mask, normalizer=self.tokens / self.world_size)

    def value(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's loss from this rank's (detached) parts: what one batch of all rows would give
        (a collective)."""
        total = torch.stack([part.detach().to(torch.float64) for part in parts]).sum()
        if dist.is_initialized():
            dist.all_reduce(total)
        return total / self.world_size


def accumulate_gradients(
    model: nn.Module,
    batches: Sequence[BlankInfillingBatch | PackedBatch],
    *,
    forward: Callable[[BlankInfillingBatch | PackedBatch], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and backward passes over this rank's micro-batches of one step, with the loss of
    :class:`StepLoss` and the gradients reduced over ranks once, with the last micro-batch.
    Returns the step's loss (detached; a collective). ``forward(batch) -> logits`` defaults to
    ``batch_logits(model, batch)``; pass one to add autocast or call a compiled model."""
    step_loss = StepLoss.for_step(batch.loss_mask for batch in batches)
    parts = []
    for batch in micro_batches(model, batches):
        logits = forward(batch) if forward is not None else batch_logits(model, batch)
        loss = step_loss(logits, batch.targets, batch.loss_mask)
        loss.backward()
        parts.append(loss.detach())
    return step_loss.value(parts)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scales all gradients so that their global norm is at most ``max_norm``; returns the norm
    before clipping as a plain tensor (FSDP2's sharded gradients are included whole)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# --------------------------------------------------------------------------------------------
# State for checkpoints


_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU under the checkpoint keys (no wrapper prefixes) on rank 0,
    ready for ``glm_ext.checkpoint.save_checkpoint(state, directory, config=...)``; other ranks of a
    process group get an empty dict. A collective: every rank calls it."""
    return get_model_state_dict(model, options=_FULL_ON_CPU)


def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a whole state dict (e.g. ``load_checkpoint(...).state_dict()``) into a plain, DDP or
    FSDP2 model; each rank keeps its shard. In a process group only rank 0's ``state`` is read
    (broadcast to the others, which may pass an empty dict); a collective."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_model_state_dict(model, state, options=options)


def save_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Writes the optimizer's state into ``directory`` with ``torch.distributed.checkpoint``: each
    rank writes its own shard (FSDP2) or, for replicated state (DDP), rank 0 writes it once. A
    collective: every rank calls it with the same directory (on a file system all ranks share).
    OSError, naming the directory and the ranks, when a rank fails to write."""
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    _checkpoint_io(dcp.save, state, directory, "write")


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | os.PathLike) -> None:
    """Reads what :func:`save_optimizer_state` wrote, resharded for this world size and wrapper
    (a collective)."""
    state: dict[str, Any] = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    _checkpoint_io(dcp.load, state, directory, "read")
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _checkpoint_io(method: Callable[..., Any], state: dict[str, Any], directory: str | os.PathLike, verb: str) -> None:
    """``dcp.save`` or ``dcp.load`` of ``state`` at ``directory``; its failure (reported by every
    rank) as one OSError."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process, as meant
        try:
            method(state, checkpoint_id=Path(directory), no_dist=not dist.is_initialized())
        except CheckpointException as exc:
            failures = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                                 for rank, (error, _trace) in sorted(exc.failures.items()))
            raise OSError(f"could not {verb} the optimizer state {directory} ({failures})") from exc
