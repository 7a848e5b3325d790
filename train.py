"""Train a GPT on a dataset folder made by prepare.py: evaluate it, checkpoint it, resume it.

    python prepare.py                                   # makes data/python
    python train.py config/train_demo.py                # ~5 minutes on a 2-core CPU
    python sample.py --out_dir=out/demo

Configuration: the module globals below are the defaults. Config files (Python, run in
order) and then --key=value flags override them (flags.py). A key that is not a default stops
the run with the closest known key; a value of the wrong type, or out of range (CHECKS,
RELATIONS), stops it before any work, naming the key. `python train.py --help` lists every
key. One process, several on one machine, or several machines (run the same command on each,
host0 being one of them):

    python train.py config/train_demo.py --batch_size=16 --max_iters=500
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=host0:29500 \
        train.py config/train_gpt2_124m.py

What a run writes into out_dir (checkpoint.py keeps the checkpoints):
    ckpt_<iter>.pt    the last keep_last checkpoints (see save_checkpoint for the contents)
    checkpoints.json  their iteration, size and sha256, recorded when each was written
    ckpt.pt, best.pt  the newest checkpoint and the one with the lowest val loss
                      (hard links, so they take no extra disk)
    metrics.jsonl     one JSON object per log line, per evaluation and per sample
    tokenizer.tiktoken a copy of a trained BPE, so sample.py needs only this folder

A run survives being stopped: SIGTERM or SIGINT (Ctrl-C) finishes the current step, saves
and exits 0, and `--init_from=resume` continues it exactly, as if it had never stopped:
same batches, same dropout masks, same losses (bit for bit on CPU; on GPUs some kernels add
in a varying order, so equal up to rounding). A step whose loss or gradient is not finite is
skipped; max_bad_steps of them in a row stop the run. Under `torchrun --max-restarts=N`,
when a process crashes torchrun restarts the group, and the restarted group goes on from
the newest checkpoint by itself (see continue_after_restart).
"""
import ctypes
import dataclasses
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import tiktoken
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from owngpt import flags
from owngpt.checkpoint import (MANIFEST_FILE, check_free_space, load_checkpoint_file, newest_valid_checkpoint, read_manifest,
                        restore_rng_states, rng_states, write_checkpoint)
from owngpt.dataset import atomic_write, open_folder, read_meta, read_split
from owngpt.hf import HF_PREFIX, read_gpt2_folder
from model import BLOCKS, GPT, GPTConfig, available_devices, peak_flops, pick_device
from owngpt.optimizers import OPTIMIZERS, build_optimizer
from owngpt.runlog import RunLog, StepTimer, draw_sample, duration, one_line, peak_memory
from owngpt.tokenizer import load_tokenizer

_NAMES_BEFORE_DEFAULTS = set(globals())
# ---- defaults ---------------------------------------------------------------
# I/O
out_dir = "out"  # where checkpoints, metrics.jsonl and the tokenizer copy go
dataset = "python"  # a folder name under data/, or a path (anything with a slash)
init_from = "scratch"  # scratch | resume (the newest valid checkpoint in out_dir) | path to a .pt (its weights only) | hf:FOLDER (a Hugging Face GPT-2 folder's weights)
eval_only = False  # evaluate the init_from checkpoint on `dataset`, print, exit
eval_interval = 250  # evaluate and save a checkpoint every this many iterations (and at the end)
eval_iters = 20  # batches per evaluation, the same fixed batches every time
log_interval = 10  # a log line and a metrics.jsonl line every this many iterations
sample_every_eval = True  # at each evaluation print and record a short sample (32 tokens of a fresh document)
keep_last = 2  # checkpoints kept in out_dir, the newest valid one always among them
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = "owngpt"  # wandb project name
wandb_run_name = "run"  # wandb run name
# data
batch_size = 32  # sequences per micro-step (per process)
block_size = 256  # context length in tokens
gradient_accumulation_steps = 1  # micro-steps per iteration, summed over all processes
# model
n_layer = 6  # transformer blocks
n_head = 6  # attention heads per block
n_embd = 384  # width of the residual stream
dropout = 0.0  # 0 for pretraining; 0.1-0.2 helps when the data is small and repeats
bias = False  # biases in Linear and LayerNorm layers, as GPT-2 had
gradient_checkpointing = False  # recompute block activations in backward: less memory, ~1/3 more compute
block = "modern"  # modern (RoPE, RMSNorm, QK-norm, ReLU^2, untied head) | gpt2 (learned positions, LayerNorm, GELU, tied head)
value_embeddings = False  # modern block: a table per layer adding a vector of the token to its attention values (n_layer x vocab x n_embd more parameters)
# optimizer
optimizer = "muon"  # muon (Muon for the blocks' weight matrices, AdamW at learning_rate for the rest) | adamw
muon_lr = 0.02  # Muon's peak learning rate (optimizer=muon)
learning_rate = 1e-3  # AdamW's peak learning rate, reached after warmup
embedding_lr = 0.3  # AdamW's peak rate for the modern block's token embedding, which starts at unit scale (the gpt2 block's is the head: learning_rate)
max_iters = 5000  # total iterations (optimizer steps)
max_time = 0.0  # seconds: stop at this wall-clock budget or at max_iters, whichever comes first (fitted once the first iterations are timed); 0 = off
weight_decay = 0.1  # decoupled weight decay, on matrices only
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
# learning rate schedule: linear warmup, then cosine or warmup-stable-decay
lr_schedule = "wsd"  # wsd (hold the peak, then decay linearly to min_lr) | cosine (decay to min_lr at lr_decay_iters)
cooldown_fraction = 0.4  # wsd: the last share of max_iters that decays to min_lr
warmup_iters = 100  # iterations of linear warmup
lr_decay_iters = 0  # the cosine reaches min_lr here; 0 = at max_iters
min_lr = 1e-4  # floor of the schedule (set it to learning_rate for a constant rate)
# system
device = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (bfloat16 on GPUs that have it, else float16; float32 on CPU) | float32 | bfloat16 | float16
compile = False  # torch.compile the model: faster on GPUs after a minute of compiling
seed = 1337  # seeds model init, batches and dropout (process k uses seed + k)
# reliability
max_bad_steps = 5  # stop after this many non-finite steps in a row
# ---- end of defaults ----------------------------------------------------------
DEFAULTS = {name: value for name, value in globals().items()
            if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
HELP = flags.comments_of(__file__)  # --help shows the comment beside each default


def checkpoint_to_start_from(value):
    return None if value in ("scratch", "resume") or os.path.isfile(value) or \
        (value.startswith(HF_PREFIX) and os.path.isdir(value.removeprefix(HF_PREFIX))) else \
        "scratch, resume, the path of a checkpoint file or hf:FOLDER (a Hugging Face GPT-2 folder)"


# What each value may be, checked before any work starts (flags.py). Every key is here but the
# booleans (true or false is all they can be) and the free-form names out_dir, dataset,
# wandb_project and wandb_run_name (a missing dataset or an unwritable out_dir is found when opened).
positive, non_negative = flags.at_least(1), flags.all_of(flags.finite, flags.at_least(0))
CHECKS = {
    "init_from": checkpoint_to_start_from,
    **dict.fromkeys(("eval_interval", "eval_iters", "log_interval", "keep_last", "batch_size", "block_size",
                     "gradient_accumulation_steps", "n_layer", "n_head", "n_embd", "max_iters", "max_bad_steps"),
                    positive),
    **dict.fromkeys(("dropout", "beta1", "beta2"), flags.all_of(flags.at_least(0), flags.below(1))),
    **dict.fromkeys(("learning_rate", "muon_lr", "embedding_lr"), flags.all_of(flags.finite, flags.above(0))),
    "max_time": non_negative,
    "cooldown_fraction": flags.between(0, 1),
    "block": flags.one_of(*BLOCKS),
    "optimizer": flags.one_of(*OPTIMIZERS),
    "lr_schedule": flags.one_of("cosine", "wsd"),
    **dict.fromkeys(("weight_decay", "grad_clip", "min_lr"), non_negative),
    **dict.fromkeys(("warmup_iters", "lr_decay_iters"), flags.at_least(0)),
    "device": lambda device: flags.one_of("auto", *available_devices())(device),  # what this machine has
    "dtype": flags.one_of("auto", "float32", "bfloat16", "float16"),
    "seed": flags.between(0, 2**31 - 1),  # numpy takes 32-bit seeds, and process k adds k
}
RELATIONS = (  # rules between keys: each returns what is wrong, or None
    lambda config: None if config["n_embd"] % config["n_head"] == 0 else
    f"n_embd={config['n_embd']} must be a multiple of n_head={config['n_head']} (each head gets n_embd / n_head)",
    lambda config: None if config["block"] != "modern" or config["n_embd"] // config["n_head"] % 2 == 0 else
    f"block=modern rotates pairs of channels: n_embd / n_head = {config['n_embd'] // config['n_head']} must be even",
    lambda config: None if config["block"] == "modern" or not config["value_embeddings"] else
    "value_embeddings=True is part of the modern block: set block=modern, or value_embeddings=False",
    lambda config: None if config["min_lr"] <= config["learning_rate"] else
    f"min_lr={config['min_lr']} must be at most learning_rate={config['learning_rate']}: the schedule decays "
    "from learning_rate down to min_lr",
    lambda config: None if not (config["eval_only"] and config["init_from"] == "scratch") else
    "eval_only=True evaluates a checkpoint: set init_from=resume or init_from=path/to/ckpt.pt",
)


class TrainError(flags.UserError):
    """A problem with the data, out_dir or the processes that the user can fix: one line, no traceback."""


def read_config(argv):
    """The defaults, then each config file in order, then each --key=value, checked: a namespace."""
    return SimpleNamespace(**flags.parse(argv, DEFAULTS, HELP, CHECKS, program="train.py", config_files=True,
                                         relations=RELATIONS))


# ----------------------------------------------------------------------------- processes and devices
def setup_runtime(cfg):
    """Rank, world size, device, dtype and autocast context; joins the process group under torchrun."""
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
        raise TrainError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not divide by "
                         f"the {world_size} processes: use a multiple of {world_size} so the global batch stays the same")
    if world_size > 1:
        join_process_group("nccl" if device.type == "cuda" else "gloo", rank, world_size)
    amp_dtype = pick_dtype(cfg.dtype, device)
    autocast = (nullcontext() if amp_dtype == torch.float32
                else torch.autocast(device_type=device.type, dtype=amp_dtype))
    return SimpleNamespace(rank=rank, world_size=world_size, is_main=rank == 0, device=device,
                           dtype=amp_dtype, autocast=autocast)


def keep_freed_memory():
    """Make glibc's malloc keep the memory a step frees for the next step (Linux only).

    By default glibc gives each large allocation (over 32 MiB at most, often far less) its
    own mmap and returns it to the kernel when freed, so every step's logits (batch x block x
    vocab floats: 64 MiB in the quick start), their gradient and the softmax come back as
    fresh pages that the kernel must fault in and zero, page by page. PyTorch's CPU allocator
    keeps no cache of its own (its performance tuning guide suggests jemalloc or tcmalloc for
    that reason). Taking every allocation from the heap (M_MMAP_MAX 0) and never shrinking it
    (M_TRIM_THRESHOLD 1 GiB) reuses the same pages instead: the quick start's step went from 305
    to 240 ms on a 2-core CPU (README: Results). See mallopt(3). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # absent from musl, where this stays a no-op
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


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


def pick_dtype(requested, device):
    """bfloat16 on GPUs that compute in it (compute capability 8.0+), float16 with a loss
    scaler on older ones, float32 elsewhere unless asked."""
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return getattr(torch, requested)


# ----------------------------------------------------------------------------- data
class TokenWindows:
    """Every window of block_size + 1 consecutive tokens inside the shards of one split.

    A window lies within one shard; window ids number them across the shards, so a batch
    is a handful of ids: random ones for training, evenly spaced fixed ones for evaluation.
    """

    def __init__(self, shards, block_size):
        self.shards = shards
        self.block_size = block_size
        self.window_ends = np.cumsum([max(0, len(tokens) - block_size) for tokens in shards])
        self.count = int(self.window_ends[-1]) if shards else 0

    def batch(self, window_ids, device):
        """Inputs and targets (len(window_ids), block_size) as int64 on device."""
        window_ids = window_ids.numpy()
        shard_of = np.searchsorted(self.window_ends, window_ids, side="right")
        rows = []
        for shard, window_id in zip(shard_of.tolist(), window_ids.tolist()):
            start = window_id - (int(self.window_ends[shard - 1]) if shard else 0)
            rows.append(self.shards[shard][start:start + self.block_size + 1])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        if device.type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        else:
            tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]

    def random_batch(self, batch_size, generator, device):
        return self.batch(torch.randint(self.count, (batch_size,), generator=generator), device)

    def fixed_batch_ids(self, num_batches, batch_size):
        """num_batches batches of window ids spread evenly over the split: the same every time."""
        total = num_batches * batch_size
        return list((torch.arange(total) * self.count // total).view(num_batches, batch_size))


def load_split(folder, meta, split, block_size):
    """The split's windows of block_size + 1 tokens (read_split checks the shards)."""
    shards = read_split(folder, meta, split)
    windows = TokenWindows(shards, block_size)
    if windows.count == 0:
        longest = max((len(tokens) for tokens in shards), default=0)
        raise TrainError(f"block_size={block_size} needs shards of at least {block_size + 1} tokens, but the "
                         f"longest {split} shard of {folder} has {longest}: lower block_size or give the "
                         f"{split} split more text")
    return windows


def token_byte_lengths(encoding, device):
    """Bytes of text each token id stands for (end-of-text counts 0: it is a boundary, not
    text), so losses can be turned into bits per byte, which compares across tokenizers."""
    lengths = [0 if token == encoding.eot_token else len(encoding.decode_single_token_bytes(token))
               for token in range(encoding.n_vocab)]
    return torch.tensor(lengths, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- checkpoints
def gather_from_ranks(value, runtime):
    """A list with every rank's value (a collective: every rank calls it)."""
    if runtime.world_size == 1:
        return [value]
    values = [None] * runtime.world_size
    dist.all_gather_object(values, value)
    return values


def save_checkpoint(run, is_best):
    """Every rank contributes its random states; rank 0 writes.

    The checkpoint is a dict of tensors and plain values (torch.load(..., weights_only=True)):
    model (clean parameter names), model_config, optimizer, scaler (or None), iter_num
    (iterations done), best_val_loss, config (every key), tokenizer (meta.json's entry),
    rng (a list: each rank's Python, numpy, torch and CUDA generator states, its batch
    sampler's state included), data ({"world_size"}: the rng list is exact for this many
    processes), elapsed_s. It is taken between iterations, after the evaluation, which uses
    fixed batches in eval mode and draws no random numbers (the sample draws from a
    generator of its own): so the resumed run starts where this one would have gone on.
    """
    states = gather_from_ranks(rng_states(run.generator, run.runtime.device), run.runtime)
    if not run.runtime.is_main:
        return
    checkpoint = {
        "model": run.raw_model.state_dict(), "model_config": dataclasses.asdict(run.raw_model.config),
        "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
        "iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "config": vars(run.cfg),
        "tokenizer": run.tokenizer_info, "rng": states, "data": {"world_size": run.runtime.world_size},
        "elapsed_s": run.elapsed_s(),
    }
    try:
        write_checkpoint(Path(run.cfg.out_dir), checkpoint, run.cfg.keep_last, is_best)
    except OSError as error:  # most often a full disk
        raise TrainError(f"saving iteration {run.iter_num} into {run.cfg.out_dir} failed: {error.strerror or error}. "
                         f"The checkpoints recorded in {MANIFEST_FILE} are intact: make room, then continue "
                         "with --init_from=resume") from None


def load_start_checkpoint(cfg, runtime):
    """(path, checkpoint) for init_from=resume or a path, else (None, None). Under torchrun
    rank 0 picks the checkpoint (verifying it) and the other ranks load the same file."""
    if cfg.init_from == "scratch":
        return None, None
    if cfg.init_from.startswith(HF_PREFIX):
        folder = cfg.init_from.removeprefix(HF_PREFIX)
        return Path(folder), read_gpt2_folder(folder)
    if cfg.init_from != "resume":
        return Path(cfg.init_from), load_checkpoint_file(cfg.init_from)
    chosen = [None]
    if runtime.is_main:
        path, checkpoint = newest_valid_checkpoint(Path(cfg.out_dir))
        chosen = [str(path)]
    if runtime.world_size > 1:
        dist.broadcast_object_list(chosen, src=0)
    if not runtime.is_main:
        path, checkpoint = Path(chosen[0]), load_checkpoint_file(chosen[0])
    return path, checkpoint


def check_checkpoint_fits(checkpoint, path, model_config, tokenizer_info, folder):
    """The dataset must use the checkpoint's tokenizer and the config its architecture."""
    trained_with = checkpoint["tokenizer"]
    for field in ("kind", "vocab_size", "eot_id", "sha256"):  # a Hugging Face folder tells only the middle two
        if field in trained_with and trained_with[field] != tokenizer_info.get(field):
            raise TrainError(f"{path} was trained with a different tokenizer than {folder} uses: "
                             f"{field} is {trained_with.get(field)!r} there and {tokenizer_info.get(field)!r} here")
    for field in ("block", "value_embeddings", "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias"):
        trained = checkpoint["model_config"].get(field, getattr(GPTConfig, field))  # older checkpoints lack the newer
        if trained != getattr(model_config, field):
            raise TrainError(f"{path} has {field}={trained!r} but the config says "
                             f"{field}={getattr(model_config, field)!r}: pass the config it was trained with")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, windows, batch_ids, byte_lengths, runtime):
    """Mean loss, next-token accuracy and bits per byte over the fixed batches; each rank
    takes every world_size-th batch and the sums are all-reduced."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss in nats (summed over tokens), correct, tokens, bytes
    for ids in batch_ids[runtime.rank::runtime.world_size]:
        inputs, targets = windows.batch(ids, runtime.device)
        with runtime.autocast:
            logits, loss = model(inputs, targets)
        totals[0] += loss.item() * targets.numel()
        totals[1] += (logits.argmax(dim=-1) == targets).sum().item()
        totals[2] += targets.numel()
        totals[3] += byte_lengths[targets].sum().item()
    model.train()
    totals = torch.tensor(totals, dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    loss_nats, correct, tokens, text_bytes = totals.tolist()
    return {"loss": loss_nats / tokens, "acc": correct / tokens, "bpb": loss_nats / math.log(2) / max(text_bytes, 1)}


def run_evaluation(run):
    """Evaluate val and train on their fixed batches; log, redraw curves.svg; return True if val loss is a new best."""
    started = time.perf_counter()
    val = evaluate(run.model, run.splits["val"], run.eval_batches["val"], run.byte_lengths, run.runtime)
    on_train = evaluate(run.model, run.splits["train"], run.eval_batches["train"], run.byte_lengths, run.runtime)
    run.eval_seconds = time.perf_counter() - started
    perplexity = math.exp(min(val["loss"], 700))
    run.log.print(f"eval at iter {run.iter_num}: val loss {val['loss']:.4f} (perplexity {perplexity:.2f}, "
                  f"accuracy {val['acc']:.1%}, {val['bpb']:.3f} bits/byte) | train loss {on_train['loss']:.4f} | "
                  f"gap {val['loss'] - on_train['loss']:+.4f} | {run.eval_seconds:.1f}s")
    run.log.write({"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter, "elapsed_s": run.elapsed_s(),
                   "val_loss": val["loss"], "val_ppl": perplexity, "val_acc": val["acc"], "val_bpb": val["bpb"],
                   "train_loss": on_train["loss"]})
    if run.cfg.sample_every_eval and run.runtime.is_main and math.isfinite(val["loss"]):  # NaN weights cannot sample
        record_sample(run)
    run.log.draw_curves()
    improved = run.iter_num > 0 and val["loss"] < run.best_val_loss
    if improved:
        run.best_val_loss = val["loss"]
    return improved


def record_sample(run):
    """Rank 0 prints and records a sample, so the text can be seen going from noise to
    structure. Generation is local (no collective): the other ranks go on and wait for
    rank 0 at the next step's all-reduce. It draws from its own generator (draw_sample), so
    a run with samples trains exactly as one without."""
    started = time.perf_counter()
    text = draw_sample(run.raw_model, run.encoding, run.cfg.seed, run.runtime.device)
    seconds = time.perf_counter() - started
    run.eval_seconds += seconds  # for the ETA and max_time
    run.log.print(f'sample at iter {run.iter_num}: "{one_line(text)}" | {seconds:.2f}s')
    run.log.write({"iter": run.iter_num, "elapsed_s": run.elapsed_s(), "sample": text, "sample_s": seconds})


# ----------------------------------------------------------------------------- one iteration
def muon_momentum_at(iteration):
    """Muon's momentum: from 0.85 up to its usual 0.95 over the first 300 iterations
    (modded-nanogpt's warmup), while the first gradients still point in changing directions.
    At 300 iterations of the quick start: 1% lower val loss."""
    return 0.95 - 0.10 * max(0.0, 1 - iteration / 300)


def learning_rate_at(iteration, cfg):
    """AdamW's learning rate at this iteration (from 0); every parameter group's rate is its
    own peak scaled alike. Linear warmup, then either a cosine decay to min_lr at
    lr_decay_iters (GPT-3 and Chinchilla's schedule) or, with wsd, the peak held until the
    last cooldown_fraction of max_iters and a linear decay to min_lr there (warmup-stable-
    decay: Hu et al. 2024, MiniCPM; as modded-nanogpt and nanochat train)."""
    if iteration < cfg.warmup_iters:
        return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "wsd":
        cooldown_start = cfg.max_iters * (1 - cfg.cooldown_fraction)
        progress = min(1.0, max(0.0, (iteration - cooldown_start) / max(1, cfg.max_iters - cooldown_start)))
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    decay_end = cfg.lr_decay_iters or cfg.max_iters
    if iteration >= decay_end:
        return cfg.min_lr
    progress = (iteration - cfg.warmup_iters) / max(1, decay_end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def forward_backward(model, next_batch, micro_steps, autocast, scaler, is_ddp):
    """Accumulate the gradients of micro_steps batches; return their mean loss (a tensor).
    DDP averages gradients across processes in the backward pass: no_sync skips that on all
    but the last micro-step, so it happens once per iteration."""
    total_loss = 0.0
    for micro_step in range(micro_steps):
        inputs, targets = next_batch()
        sync = not is_ddp or micro_step == micro_steps - 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                _, loss = model(inputs, targets)
            loss = loss / micro_steps
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss = total_loss + loss.detach()
    return total_loss


def optimizer_step(run, loss, stop_requested):
    """Clip, agree across ranks, step. Returns (mean loss over ranks, grad norm, skipped, stop).

    One all-reduce carries the loss, a non-finite flag and the stop request, so every rank
    skips the same bad steps and stops after the same iteration. A skipped step changes
    neither the parameters nor the optimizer state.
    """
    params = [p for p in run.raw_model.parameters() if p.requires_grad]
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf)
    # with a loss scaler, inf gradients are its normal overflow signal: scaler.step skips those itself
    not_finite = ~torch.isfinite(loss) if run.scaler else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    flags = torch.stack([loss.float(), not_finite.float(), torch.tensor(float(stop_requested), device=loss.device)])
    if run.runtime.world_size > 1:
        dist.all_reduce(flags)
    loss_sum, not_finite_count, stop_count = flags.tolist()
    skipped = not_finite_count > 0
    if not skipped:
        if run.scaler:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
    if run.scaler:
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / run.runtime.world_size, grad_norm.item(), skipped, stop_count > 0


# ----------------------------------------------------------------------------- logging
def print_plan(run):
    """The cost of the run before it starts: parameters, tokens, FLOPs."""
    cfg, params = run.cfg, run.raw_model.num_params()
    total_tokens = run.tokens_per_iter * cfg.max_iters
    run.log.print(
        f"plan: {params / 1e6:.2f}M parameters | {run.tokens_per_iter:,} tokens/iter ({cfg.batch_size} x "
        f"{cfg.block_size} tokens x {cfg.gradient_accumulation_steps} micro-steps, over {run.runtime.world_size} "
        f"process{'es' if run.runtime.world_size > 1 else ''})\n"
        f"      {cfg.max_iters:,} iterations = {total_tokens / 1e6:,.1f}M tokens = {total_tokens / params:.1f} tokens "
        f"per parameter (Chinchilla-optimal: ~20) | {run.raw_model.flops_per_token() * total_tokens:.2e} FLOPs\n"
        f"      device {run.runtime.device}, {str(run.runtime.dtype).removeprefix('torch.')}, compile={cfg.compile}")


def log_step(run, loss, grad_norm, skipped, lr):
    ms_per_iter = run.timer.take_ms()
    tokens_per_s = run.tokens_per_iter / (ms_per_iter / 1000)
    record = {"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter, "elapsed_s": run.elapsed_s(), "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "ms_per_iter": ms_per_iter, "tokens_per_s": tokens_per_s, "skipped": skipped}
    text = (f"iter {run.iter_num}/{run.cfg.max_iters}: loss {loss:.4f} | lr {lr:.2e} | {ms_per_iter:.0f} ms/iter | "
            f"{tokens_per_s:,.0f} tokens/s")
    if run.peak_flops:
        record["mfu"] = run.raw_model.flops_per_token() * tokens_per_s / (run.peak_flops * run.runtime.world_size)
        text += f" | MFU {record['mfu']:.1%}"
    remaining_iters = run.cfg.max_iters - run.iter_num
    remaining_evals = remaining_iters // run.cfg.eval_interval + 1
    eta = remaining_iters * ms_per_iter / 1000 + remaining_evals * run.eval_seconds
    run.log.print(text + f" | ETA {duration(eta)}" + (" | SKIPPED: loss or gradient not finite" if skipped else ""))
    run.log.write(record)
    if not run.estimate_printed and run.timer.timed_steps >= 5:
        run.estimate_printed = True
        run.log.print(f"estimated wall time of the whole run on {run.runtime.device}: "
                      f"{duration(run.elapsed_s() + eta)} ({ms_per_iter:.0f} ms/iter, "
                      f"{run.eval_seconds:.1f}s per evaluation)")


# ----------------------------------------------------------------------------- the run
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


def read_dataset(read):
    """read(), with OS and value errors about the dataset files (they name the file) made TrainErrors."""
    try:
        return read()
    except (ValueError, OSError) as error:
        raise TrainError(str(error)) from error


def continue_after_restart(cfg, runtime):
    """torchrun --max-restarts=N starts the whole group again, with the same command, when a
    process fails; TORCHELASTIC_RESTART_COUNT counts the restarts. A restarted group goes on
    from the newest valid checkpoint in out_dir, which the failed attempt wrote, instead of
    starting over: init_from becomes resume. Returns whether it did (with no checkpoint yet,
    the group starts as configured)."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restarts or cfg.eval_only or cfg.init_from == "resume" or not read_manifest(Path(cfg.out_dir)):
        return False
    if runtime.is_main:
        print(f"torchrun restart {restarts}: continuing from the newest valid checkpoint in {cfg.out_dir}", flush=True)
    cfg.init_from = "resume"
    return True


def check_same_run(checkpoint, path, cfg):
    """A restart resumes only a checkpoint of this very command (the first attempt refuses to
    start over another run's checkpoints, so these may not be its own). out_dir may differ:
    the run may have been moved, and a max_time run's max_iters was fitted by the run."""
    for key, value in vars(cfg).items():
        if key in ("init_from", "out_dir") or (key == "max_iters" and cfg.max_time):
            continue
        if checkpoint["config"].get(key, DEFAULTS[key]) != value:
            raise TrainError(f"torchrun restart: {path} belongs to another run ({key} is "
                             f"{checkpoint['config'].get(key)!r} there, {value!r} here): choose another out_dir")


def prepare_out_dir(cfg, folder, tokenizer_info, resuming):
    """Create out_dir; refuse to start a new run over a recorded one; remove what a killed
    save left (atomic_write's temporary .<name>.<random>.tmp files); copy a trained
    tokenizer."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"out_dir {out} is a file, not a folder: choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # an unwritable out_dir shows now, not at the first save
    except OSError as error:
        raise TrainError(f"out_dir {out} is not writable: {error.strerror or error}") from None
    if not resuming and read_manifest(out):
        raise TrainError(f"{out} already holds checkpoints of a run: continue it with init_from=resume, "
                         "or choose another out_dir")
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    if tokenizer_info.get("file"):
        source = folder / tokenizer_info["file"]
        atomic_write(out / tokenizer_info["file"], lambda file: file.write(source.read_bytes()))


def saved_before_embedding_lr(checkpoint):
    """Whether checkpoint's AdamW has the two groups it had before the untied embedding got
    a group of its own: such a run resumes with its embedding at learning_rate."""
    saved = checkpoint["optimizer"]
    return len(saved.get("adamw", saved)["param_groups"]) == 2


def restore_training_state(checkpoint, path, optimizer, optimizer_kind, scaler, generator, runtime):
    """Load the optimizer, the loss scaler and this process's random states from checkpoint;
    return the progress it holds, as Run's fields."""
    trained_with = checkpoint["config"].get("optimizer", "adamw")  # checkpoints from before Muon: AdamW
    if trained_with != optimizer_kind:
        raise TrainError(f"{path} was trained with optimizer={trained_with}, this run asks for "
                         f"optimizer={optimizer_kind}: resume with the optimizer it was trained with")
    optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint["data"]["world_size"] == runtime.world_size:
        restore_rng_states(checkpoint["rng"][runtime.rank], generator, runtime.device)
        exactness = "exactly"
    else:
        exactness = (f"with fresh random streams (saved by {checkpoint['data']['world_size']} processes, "
                     f"resumed by {runtime.world_size})")
    if runtime.is_main:
        print(f"resuming from {path} at iteration {checkpoint['iter_num']}, {exactness}", flush=True)
    return {"iter_num": checkpoint["iter_num"], "best_val_loss": checkpoint["best_val_loss"],
            "elapsed_before": checkpoint["elapsed_s"]}


@dataclasses.dataclass
class Run:
    """What the training loop carries: made once by build_run, read by train() and the
    functions it calls. Only the fields under "progress" change as the loop goes."""
    cfg: SimpleNamespace  # the checked config (read_config)
    runtime: SimpleNamespace  # rank, world_size, is_main, device, dtype, autocast (setup_runtime)
    log: RunLog  # prints on rank 0; metrics.jsonl and wandb
    stop: threading.Event  # set by SIGTERM or SIGINT: finish the step, save, exit
    # data
    splits: dict  # "train" and "val": TokenWindows
    eval_batches: dict  # split -> the fixed batches of window ids every evaluation uses
    byte_lengths: torch.Tensor  # bytes of text per token id, for bits per byte
    encoding: tiktoken.Encoding  # the dataset's tokenizer: decodes the samples
    tokenizer_info: dict  # meta.json's tokenizer entry, saved in each checkpoint for sample.py
    generator: torch.Generator  # draws the training batches (process k seeds it with seed + k)
    # model and optimizer
    raw_model: GPT  # the parameters, for state_dict and clipping
    model: torch.nn.Module  # raw_model, compiled when asked: what evaluation runs
    train_model: torch.nn.Module  # model, wrapped in DDP under torchrun: what training runs
    optimizer: torch.optim.Optimizer  # AdamW, or optimizers.MuonAndAdamW
    scaler: torch.amp.GradScaler | None  # float16 only: scales the loss so small gradients survive
    micro_steps: int  # micro-steps per iteration in this process
    tokens_per_iter: int  # over all micro-steps and processes
    peak_flops: float | None  # the GPU's datasheet FLOP/s, for MFU; None where unknown
    started: float  # time.time() when this process began building the run
    # progress
    iter_num: int = 0  # iterations done (optimizer steps, skipped ones included)
    best_val_loss: float = math.inf  # the lowest val loss so far: best.pt's
    elapsed_before: float = 0.0  # seconds spent by the runs this one resumes
    eval_seconds: float = 0.0  # the last evaluation's duration, for the ETA
    timer: StepTimer = dataclasses.field(default_factory=StepTimer)  # step times between log lines
    estimate_printed: bool = False  # the whole run's wall time is estimated once, after 5 timed steps

    def elapsed_s(self):
        return self.elapsed_before + time.time() - self.started


def build_run(cfg):
    """Everything the loop needs: data, model, optimizer, and the restored state on resume."""
    started = time.time()
    runtime = setup_runtime(cfg)
    stop = install_stop_handlers(runtime)
    folder = open_folder(cfg.dataset)
    meta = read_dataset(lambda: read_meta(folder))
    restarted = continue_after_restart(cfg, runtime)
    path, checkpoint = load_start_checkpoint(cfg, runtime)
    if restarted:
        check_same_run(checkpoint, path, cfg)
    model_config = (GPTConfig(**checkpoint["model_config"]) if cfg.eval_only else
                    GPTConfig(block_size=cfg.block_size, vocab_size=meta["tokenizer"]["vocab_size"], n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                              gradient_checkpointing=cfg.gradient_checkpointing, block=cfg.block,
                              value_embeddings=cfg.value_embeddings))
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, path, model_config, meta["tokenizer"], folder)
    splits = {split: read_dataset(lambda: load_split(folder, meta, split, model_config.block_size))
              for split in ("train", "val")}
    resuming = cfg.init_from == "resume" and not cfg.eval_only
    if runtime.is_main and not cfg.eval_only:
        prepare_out_dir(cfg, folder, meta["tokenizer"], resuming)

    random.seed(cfg.seed + runtime.rank)
    np.random.seed(cfg.seed + runtime.rank)
    torch.manual_seed(cfg.seed + runtime.rank)  # different dropout masks per rank; DDP copies rank 0's init
    raw_model = GPT(model_config)
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
    if runtime.is_main and not cfg.eval_only:
        check_free_space(Path(cfg.out_dir), raw_model, cfg.keep_last)
    raw_model.to(runtime.device)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    encoding = read_dataset(lambda: load_tokenizer(folder, meta["tokenizer"]))
    byte_lengths = token_byte_lengths(encoding, runtime.device)
    train_model = DistributedDataParallel(model) if runtime.world_size > 1 else model
    optimizer = build_optimizer(raw_model, cfg.optimizer, cfg.learning_rate, cfg.muon_lr, cfg.weight_decay,
                                (cfg.beta1, cfg.beta2), runtime.device.type,
                                None if resuming and saved_before_embedding_lr(checkpoint) else cfg.embedding_lr)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.dtype == torch.float16 else None
    generator = torch.Generator().manual_seed(cfg.seed + runtime.rank)
    progress = restore_training_state(checkpoint, path, optimizer, cfg.optimizer, scaler, generator, runtime) if resuming else {}
    if resuming and cfg.max_time and progress["iter_num"] >= TIMED_ITERATIONS[1]:
        cfg.max_iters = checkpoint["config"]["max_iters"]  # fitted to max_time already: end where it would have
    return Run(
        cfg=cfg, runtime=runtime, log=RunLog(cfg, runtime, progress.get("iter_num")), stop=stop,
        splits=splits, byte_lengths=byte_lengths, encoding=encoding, tokenizer_info=meta["tokenizer"], generator=generator,
        eval_batches={split: windows.fixed_batch_ids(cfg.eval_iters, cfg.batch_size) for split, windows in splits.items()},
        raw_model=raw_model, model=model, train_model=train_model, optimizer=optimizer, scaler=scaler,
        micro_steps=cfg.gradient_accumulation_steps // runtime.world_size,
        tokens_per_iter=cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps,
        peak_flops=peak_flops(runtime.device), started=started, **progress)


# max_time: iterations 6..30 are timed. The first ones grow the heap and warm caches up; 25
# average out a machine that is busy for a second (10 of them made 4.5-minute runs of the
# quick start end anywhere from 225 to 292 s on a shared 2-core CPU).
TIMED_ITERATIONS = (5, 30)


def fit_max_iters_to_time(run, seconds_per_iter):
    """max_time: the iterations that fit in the time left, counting the evaluations they
    bring, or max_iters if fewer; rank 0's figure for all processes; kept in cfg, so
    checkpoints carry it and a resumed run ends where this one would have."""
    cfg = run.cfg
    per_iter = seconds_per_iter + run.eval_seconds / cfg.eval_interval
    fitted = torch.tensor(run.iter_num + max(1, int((cfg.max_time - run.elapsed_s()) / per_iter)))
    if run.runtime.world_size > 1:
        dist.broadcast(fitted, src=0)
    cfg.max_iters = min(cfg.max_iters, int(fitted))
    run.log.print(f"max_time={cfg.max_time:g}s: {seconds_per_iter * 1000:.0f} ms/iter and {run.eval_seconds:.1f}s "
                  f"per evaluation fit max_iters={cfg.max_iters}")


def train(run):
    """The loop: step, log, evaluate and checkpoint; stop on request or on repeated bad steps."""
    cfg = run.cfg
    print_plan(run)
    if run.iter_num == 0:
        run_evaluation(run)  # the starting point of the curves
    next_batch = lambda: run.splits["train"].random_batch(cfg.batch_size, run.generator, run.runtime.device)
    bad_in_a_row = skipped_total = 0
    timed_from = max(TIMED_ITERATIONS[0], run.iter_num)  # a run resumed among the timed iterations times the rest
    timing_started = time.perf_counter()
    while run.iter_num < cfg.max_iters:
        lr = learning_rate_at(run.iter_num, cfg)
        for group in run.optimizer.param_groups:  # each group's peak (optimizers.py), scaled alike
            group["lr"] = getattr(cfg, group.get("lr_key", "learning_rate")) * lr / cfg.learning_rate
            if "momentum" in group:  # Muon's
                group["momentum"] = muon_momentum_at(run.iter_num)
        started = time.perf_counter()
        loss = forward_backward(run.train_model, next_batch, run.micro_steps, run.runtime.autocast, run.scaler,
                                run.runtime.world_size > 1)
        loss, grad_norm, skipped, stop = optimizer_step(run, loss, run.stop.is_set())
        run.iter_num += 1
        run.timer.add(time.perf_counter() - started)
        if cfg.max_time and run.iter_num == timed_from:
            timing_started = time.perf_counter()
        if cfg.max_time and run.iter_num == TIMED_ITERATIONS[1]:
            fit_max_iters_to_time(run, (time.perf_counter() - timing_started) / (TIMED_ITERATIONS[1] - timed_from))
        bad_in_a_row = bad_in_a_row + 1 if skipped else 0
        skipped_total += skipped
        if skipped or stop or run.iter_num % cfg.log_interval == 0:
            log_step(run, loss, grad_norm, skipped, lr)
        if bad_in_a_row >= cfg.max_bad_steps:
            raise TrainError(f"stopping at iteration {run.iter_num}: {bad_in_a_row} steps in a row had a loss or "
                             f"gradient that is not finite (the first at iteration {run.iter_num - bad_in_a_row + 1}); "
                             "nothing new was saved. Lower learning_rate, or resume from the last checkpoint")
        at_eval = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters
        improved = run_evaluation(run) if at_eval else False
        if (at_eval or stop) and bad_in_a_row == 0:  # never save while steps are failing
            save_checkpoint(run, improved)
        if stop:
            run.log.print(f"stopped at iteration {run.iter_num}: continue with --init_from=resume")
            break
    run.log.print(f"done: iteration {run.iter_num} in {duration(run.elapsed_s())}, "
                  f"{run.iter_num * run.tokens_per_iter:,} tokens seen, {skipped_total} steps skipped, "
                  f"peak memory {peak_memory()}")


def evaluate_only(run):
    val = evaluate(run.model, run.splits["val"], run.eval_batches["val"], run.byte_lengths, run.runtime)
    if run.runtime.is_main:
        print(f"{run.cfg.init_from} on {run.cfg.dataset}: val loss {val['loss']:.4f} | perplexity "
              f"{math.exp(min(val['loss'], 700)):.2f} | accuracy {val['acc']:.1%} | {val['bpb']:.3f} bits/byte")


def main(argv):
    try:
        cfg = read_config(argv)
        run = build_run(cfg)
        evaluate_only(run) if cfg.eval_only else train(run)
        run.log.finish()
        if dist.is_initialized():
            dist.barrier()  # no process leaves while another may still be saving or using the group
    except flags.UserError as error:
        leave(f"error: {error}")
    leave(None)


def leave(message):
    """Exit with message (status 1) or without (0). In a group: destroy it, flush, os._exit. When
    Python tore itself down as usual, gloo aborted now and then ('terminate called without an
    active exception': 7 of 25 two-process runs on a loaded 2-core CPU; 0 of 25 with os._exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        if message:
            print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if message else 0)
    if message:
        sys.exit(message)


if __name__ == "__main__":
    main(sys.argv[1:])
