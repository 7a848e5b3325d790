"""Where a run computes: the device and dtype, the process group under torchrun, the signals
that stop a run, and the way a process leaves.

    runtime = setup_runtime(cfg)         # rank, world_size, is_main, device, dtype, autocast
    stop = install_stop_handlers(runtime)  # a threading.Event set by SIGTERM or Ctrl-C
    ...
    leave(None)                          # exit 0 (or leave("error: ...") to exit 1)

Nothing here knows the model or the files: train.py and sample.py call it.
"""
import ctypes
import os
import signal
import sys
import threading
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist

from owngpt.costs import card_of_device
from owngpt.flags import UserError


class RuntimeSetupError(UserError):
    """Processes or devices that cannot run the config as given: one line, no traceback."""


# ----------------------------------------------------------------------------- devices
def available_devices() -> list[str]:
    """The torch devices this machine has: cpu, cuda and cuda:0, cuda:1... per GPU, mps."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def pick_device(requested: str) -> str:
    """The device to run on: auto takes cuda, then mps, then cpu; any other must be one of
    available_devices(), else ValueError naming those."""
    devices = available_devices()
    if requested == "auto":
        return next(device for device in ("cuda", "mps", "cpu") if device in devices)
    if requested not in devices:
        raise ValueError(f"device {requested!r} is not on this machine, which has: auto, {', '.join(devices)}")
    return requested


def pick_dtype(requested, device):
    """bfloat16 on GPUs that compute in it (compute capability 8.0+), float16 with a loss
    scaler on older ones, float32 elsewhere unless asked."""
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return getattr(torch, requested)


def setup_runtime(cfg):
    """Rank, world size, device, dtype, autocast context and the GPU's peak FLOP/s (for MFU);
    joins the process group under torchrun."""
    rank, local_rank, world_size = (int(os.environ.get(name, default)) for name, default in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device(pick_device(cfg.device))
    if device.type == "cuda":
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~8x faster than fp32, loss unchanged
    elif device.type == "cpu":
        keep_freed_memory()
    if cfg.gradient_accumulation_steps % world_size:
        raise RuntimeSetupError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not divide by "
                                f"the {world_size} processes: use a multiple of {world_size} so the global batch "
                                "stays the same")
    if world_size > 1:
        join_process_group("nccl" if device.type == "cuda" else "gloo", rank, world_size)
    runtime = SimpleNamespace(rank=rank, world_size=world_size, is_main=rank == 0, device=device,
                              peak_flops=peak_flops(device))
    set_dtype(runtime, cfg.dtype)
    if cfg.parallelism == "fsdp" and runtime.dtype == torch.float16:
        raise RuntimeSetupError("parallelism=fsdp computes in bfloat16 or float32, not float16 (which needs a loss "
                                "scaler): set dtype=float32, or parallelism=ddp")
    return runtime


def set_dtype(runtime, dtype):
    """The dtype the run computes in (pick_dtype's, from the config's name) and its autocast
    context; float32 needs none. On a CPU, train.py may set it again once a step is timed."""
    runtime.dtype = pick_dtype(dtype, runtime.device)
    runtime.autocast = (nullcontext() if runtime.dtype == torch.float32
                        else torch.autocast(device_type=runtime.device.type, dtype=runtime.dtype))


def keep_freed_memory():
    """Make glibc's malloc keep the memory a step frees for the next step (Linux only).

    By default glibc gives each large allocation (over 32 MiB at most, often far less) its
    own mmap and returns it to the kernel when freed, so every step's logits (batch x block x
    vocab floats), their gradient and the softmax come back as fresh pages that the kernel
    must fault in and zero, page by page. PyTorch's CPU allocator keeps no cache of its own
    (its performance tuning guide suggests jemalloc or tcmalloc for that reason). Taking every
    allocation from the heap (M_MMAP_MAX 0) and never shrinking it (M_TRIM_THRESHOLD 1 GiB)
    reuses the same pages instead, for a larger peak RSS (RESULTS.md: the allocator).
    See mallopt(3). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl, where this stays a no-op
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def peak_flops(device) -> float | None:
    """Peak dense bf16 tensor FLOP/s of the GPU behind `device` (for MFU), from the card table
    (owngpt/costs.py); None for CPU, MPS and any card not in the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_of_card(torch.cuda.get_device_name(device))


def peak_flops_of_card(name: str) -> float | None:
    """A card's peak FLOP/s by its name as torch.cuda.get_device_name spells it."""
    card = card_of_device(name)
    return card.peak_flops if card else None


# ----------------------------------------------------------------------------- processes
def join_process_group(backend, rank, world_size):
    """dist.init_process_group, with each torchrun attempt's keys kept apart.

    torchrun --max-restarts=N starts every process again when one fails, but its agent keeps
    one key-value store for all attempts: a restarted process can read the addresses the
    failed attempt left there, and then fails or hangs connecting to processes that are gone
    (pytorch issue 135712). The keys of restart N get the prefix attempt_N."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # no agent store: the usual MASTER_ADDR/PORT
        dist.init_process_group(backend=backend)
        return
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", agent_store),
                            rank=rank, world_size=world_size)


def restarted():
    """What started this run again, as the log says it: "torchrun restart N" (torchrun
    --max-restarts started the group again after a process failed) or "Slurm requeue N" (a
    preempted or requeued Slurm job runs its script again); None on a first start."""
    for variable, what in (("TORCHELASTIC_RESTART_COUNT", "torchrun restart"), ("SLURM_RESTART_COUNT", "Slurm requeue")):
        count = os.environ.get(variable, "0")
        if count not in ("", "0"):
            return f"{what} {count}"
    return None


def gather_from_ranks(value, runtime):
    """A list with every rank's value (a collective: every rank calls it)."""
    if runtime.world_size == 1:
        return [value]
    values = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def from_rank_0(value, runtime):
    """Rank 0's value, on every rank (a collective: every rank calls it)."""
    if runtime.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def install_stop_handlers(runtime):
    """SIGTERM (preemption, `kill`, torchrun's forwarding) and SIGINT (Ctrl-C) ask the loop
    to finish its step, save and exit 0. SIGKILL cannot be caught: checkpoints cover that."""
    stop = threading.Event()

    def request_stop(signum, frame):
        if runtime.is_main and not stop.is_set():
            print(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving", flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def leave(message):
    """Exit with message (status 1) or without (0). In a group: destroy it, flush, os._exit:
    when Python tore itself down as usual, gloo aborted now and then ('terminate called
    without an active exception'; RESULTS.md: gloo and os._exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        if message:
            print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if message else 0)
    if message:
        sys.exit(message)
