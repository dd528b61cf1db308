"""Where and how a run executes: its place among torchrun's processes, its device, and its mixed precision.

The CLI reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``) and passes them as
:class:`DistInfo`; a distributed run uses NCCL on GPU and gloo on CPU. ``train.batch_size`` is the global
batch, split evenly over the processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.config import TrainConfig
from training.errors import RunError

__all__ = [
    "DistInfo",
    "Runtime",
    "all_reduce",
    "barrier",
    "cpu_bf16_support",
    "process_group",
    "rank_seed",
    "resolve_runtime",
]

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16 ("flags"), ARMv8.6 BF16 ("Features")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (from torchrun's environment, read by the CLI)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True, eq=False)
class Runtime:
    """The process's execution settings, fixed for the whole run.

    ``autocast()`` opens the mixed-precision context of the forward passes; ``scaler`` is enabled only for
    fp16 on CUDA; ``local_batch`` is this process's share of ``train.batch_size``. ``amp_note`` is a line for
    the run log about the precision on the CPU (bf16 autocast asked for on a CPU without native bf16, or not
    asked for on a CPU with it), None when there is nothing to say.
    """

    dist: DistInfo
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler
    amp_text: str
    local_batch: int
    amp_note: str | None = None


def resolve_runtime(cfg: TrainConfig, dist: DistInfo) -> Runtime:
    """The Runtime ``cfg.train`` asks for; also sets torch's determinism and cuDNN benchmark flags."""
    t = cfg.train
    if t.batch_size % dist.world_size:
        raise RunError(
            f"train.batch_size {t.batch_size} (global) must be divisible by the {dist.world_size} processes"
        )
    device = _resolve_device(cfg, dist)
    autocast, use_scaler, amp_text = _autocast_factory(cfg, device)
    amp_note = None
    if device.type == "cpu":
        native, evidence = cpu_bf16_support()
        if t.amp_cpu:
            amp_text, amp_note = _cpu_bf16_text(native, evidence)
        elif native:
            amp_note = (
                f"this CPU computes bf16 natively ({evidence}): train.amp_cpu: true trains in bf16 autocast, "
                'faster (docs/performance.md, "Training on CPU: bf16")'
            )
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    # Only touched when asked: the setter imports torch's compiler stack (seconds of start-up).
    if t.deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(t.deterministic, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not t.deterministic
    return Runtime(
        dist=dist,
        device=device,
        autocast=autocast,
        scaler=scaler,
        amp_text=amp_text,
        local_batch=t.batch_size // dist.world_size,
        amp_note=amp_note,
    )


@contextlib.contextmanager
def process_group(cfg: TrainConfig, dist: DistInfo) -> Iterator[None]:
    """Joins torchrun's process group when there is more than one process and none is joined yet; leaves
    it afterwards. Torch's determinism and cuDNN flags, which a run sets, are put back as they were."""
    created_group = False
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if _resolve_device(cfg, dist).type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, rank=dist.rank, world_size=dist.world_size, timeout=timedelta(minutes=60)
        )
        created_group = True
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        if torch.are_deterministic_algorithms_enabled() != previous[0]:
            torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]
        if created_group:
            torch.distributed.destroy_process_group()


def _resolve_device(cfg: TrainConfig, dist: DistInfo) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device is 'cuda' but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if dist.world_size > 1:
            torch.cuda.set_device(dist.local_rank)
            return torch.device("cuda", dist.local_rank)
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast_factory(cfg: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], bool, str]:
    """(context factory, use a grad scaler, description)."""
    t = cfg.train
    if device.type == "cuda" and t.amp:
        dtype = torch.bfloat16 if t.amp_dtype == "bf16" else torch.float16
        return (lambda: torch.autocast("cuda", dtype=dtype)), dtype == torch.float16, f"amp {t.amp_dtype}"
    if device.type == "cpu" and t.amp_cpu:
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), False, "amp bf16 (cpu)"
    return contextlib.nullcontext, False, "amp off"


def cpu_bf16_support(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[bool | None, str]:
    """Whether this CPU computes in bf16 natively: (answer, the evidence in words); None where it cannot tell.

    Native means the flags AVX512-BF16 or AMX-BF16 (x86) or BF16 (ARM) in ``cpuinfo`` (Linux). Without them
    torch's CPU autocast still runs bf16, emulated through conversions to and from fp32, and is usually
    slower than fp32. torch's own CPU capability (``AVX512``, ``AVX2``...) is named in the evidence; it does
    not say whether bf16 is native.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, f"no {cpuinfo} to read the CPU's flags from (torch CPU capability {capability})"
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None, f"{cpuinfo} lists no CPU flags (torch CPU capability {capability})"
    native = [flag for flag in _BF16_FLAGS if flag in flags]
    if native:
        return True, f"{'/'.join(native)} (torch CPU capability {capability})"
    return False, f"no avx512_bf16, amx_bf16 or bf16 flag (torch CPU capability {capability})"


def _cpu_bf16_text(native: bool | None, evidence: str) -> tuple[str, str | None]:
    """(amp_text, log note) for bf16 autocast on this CPU."""
    if native:
        return "amp bf16 (cpu)", None
    if native is None:
        return "amp bf16 (cpu)", (
            f"train.amp_cpu: could not tell whether this CPU has native bf16 ({evidence}); without it bf16 "
            "autocast is emulated and usually slower than fp32"
        )
    return "amp bf16 (cpu, emulated)", (
        f"train.amp_cpu: this CPU has no native bf16 ({evidence}); bf16 autocast still runs, emulated through "
        "fp32 conversions, and is usually slower than fp32: set train.amp_cpu to false"
    )


def rank_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from the run seed and integers (epoch, rank...), stable across runs and platforms."""
    value = seed & 0xFFFFFFFFFFFF
    for part in parts:
        value = (value * 6364136223846793005 + part + 1442695040888963407) % (1 << 63)
    return value


def all_reduce(tensor: Tensor, dist: DistInfo) -> Tensor:
    """The sum of ``tensor`` over the processes, in place (unchanged in a single process)."""
    if dist.world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def barrier(dist: DistInfo) -> None:
    if dist.world_size > 1:
        torch.distributed.barrier()
