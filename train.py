"""Train a GPT on a dataset folder made by prepare.py: evaluate it, checkpoint it, resume it.

    python prepare.py                                   # makes data/python
    python train.py config/train_demo.py                # 4.5 minutes on a 2-core CPU
    python train.py config/train_demo.py --batch_size=16 --max_iters=500 --out_dir=out/b16
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py --parallelism=fsdp

The module globals below are the defaults; config files (run in order), then --key=value
flags override them, every key and value checked before any work starts (`--help` lists them).

train() is the loop: each iteration sets the learning rates, accumulates the gradients of
gradient_accumulation_steps micro-batches (forward_backward), clips and steps
(optimizer_step), logs, and every eval_interval iterations evaluates and saves a checkpoint
(ckpt.pt the newest, best.pt the lowest val loss: owngpt/checkpoint.py). build_run makes what
it needs: data, model, optimizer, and on resume the checkpoint's state.

SIGTERM or Ctrl-C finishes the step, saves and exits 0; `--init_from=resume` continues the
run exactly: same batches, dropout masks and losses (bit for bit on CPU; on GPUs some kernels
add in a varying order). A step whose loss or gradient is not finite is skipped; max_bad_steps
in a row stop the run. Started again by `torchrun --max-restarts=N` or a Slurm requeue, a run
goes on from its newest checkpoint by itself.
"""
import dataclasses
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model import GPT, GPTConfig
from owngpt import cpu, flags
from owngpt.train_checks import CHECKS, RELATIONS  # what each key may be
from owngpt.budget import TIMED_ITERATIONS, TimeBudget
from owngpt.checkpoint import (MANIFEST_FILE, add_chat_tokens, check_checkpoint_fits, check_free_space, check_same_run,
                               checkpoint_to_start, continue_after_restart, grown_weights, prepare_out_dir,
                               release_out_dirs, restore_training_state, rng_states, saved_before_embedding_lr,
                               write_checkpoint, write_sharded_checkpoint)
from owngpt.dataset import SPLITS, dataset_errors, load_windows, open_folder, read_meta
from owngpt.epochs import DATA_DEFAULTS, epochs, reads_line
from owngpt.optimizers import build_optimizer, patience_ending, set_learning_rates, set_weight_decay
from owngpt.parallel import clip_gradients, gathered, states_to_save, wrap_model
from owngpt.runlog import RunLog, StepTimer, duration, log_step, peak_memory
from owngpt.runtime import gather_from_ranks, install_stop_handlers, leave, setup_runtime
from owngpt.tasks import evaluate_tasks, load_tasks, task_metrics, tasks_line
from owngpt.tokenizer import load_tokenizer, token_byte_lengths

_NAMES_BEFORE_DEFAULTS = set(globals())
# ---- defaults ---------------------------------------------------------------
# I/O
out_dir = "out"  # where checkpoints, metrics.jsonl and the tokenizer copy go
dataset = "python"  # a folder name under data/, or a path (anything with a slash)
init_from = "scratch"  # scratch | resume (the newest valid checkpoint in out_dir) | path to a .pt (its weights only) | hf:FOLDER (a Hugging Face GPT-2 or NanoChat folder's weights)
eval_only = False  # evaluate the init_from checkpoint on `dataset`, print, exit
eval_interval = 250  # evaluate and save a checkpoint every this many iterations (and at the end)
eval_iters = 20  # batches per evaluation, the same fixed batches every time
eval_tasks = ()  # multiple-choice tasks scored at each evaluation and by eval_only: hellaswag and/or your .jsonl files (owngpt/tasks.py)
eval_task_items = 0  # the first this many items of each task; 0 = all
patience = 0  # stop after this many evaluations without a new best val loss (wsd: cool down first, then stop); 0 = never
log_interval = 10  # a log line and a metrics.jsonl line every this many iterations
sample_every_eval = True  # at each evaluation print and record a short sample (32 tokens of a fresh document)
keep_last = 2  # checkpoints kept in out_dir, the newest valid one always among them
sharded_checkpoint = False  # each process writes its share of the state (a ckpt_<iter>.dcp folder), not rank 0 the whole: for models whose whole state does not fit rank 0's memory; it resumes on any number of processes
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
dropout = 0.0  # unless set: from how many times the run reads the train split, 0 up to 4 times, then 0.2 (owngpt/epochs.py)
bias = False  # biases in Linear and LayerNorm layers, as GPT-2 had
gradient_checkpointing = False  # recompute block activations in backward: less memory, ~1/4 more compute
block = "modern"  # modern (RoPE, RMSNorm, QK-norm, ReLU^2, untied head) | gpt2 (learned positions, LayerNorm, GELU, tied head)
value_embeddings = False  # modern block: a table per layer adding a vector of the token to its attention values (n_layer x vocab x n_embd more parameters)
# optimizer
optimizer = "muon"  # muon (Muon for the blocks' weight matrices, AdamW at learning_rate for the rest) | adamw
muon_lr = 0.02  # Muon's peak learning rate (optimizer=muon)
learning_rate = 1e-3  # AdamW's peak learning rate, reached after warmup
embedding_lr = 0.3  # AdamW's peak rate for the modern block's token embedding, which starts at unit scale (the gpt2 block's is the head: learning_rate)
max_iters = 5000  # total iterations (optimizer steps)
max_time = 0.0  # seconds: stop at this wall-clock budget or at max_iters, whichever comes first (fitted once the first iterations are timed); 0 = off
weight_decay = 0.1  # decoupled weight decay, on matrices only (AdamW's); unless set: 0.1 up to 4 reads of the train split, then 1.0 (owngpt/epochs.py)
beta1 = 0.9  # AdamW beta1
beta2 = 0.95  # AdamW beta2
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
# learning rate schedule: linear warmup, then cosine or warmup-stable-decay
lr_schedule = "wsd"  # wsd (hold the peak, then decay linearly to min_lr) | cosine (decay to min_lr at lr_decay_iters)
cooldown_fraction = 0.4  # wsd: the last share of the iterations up to lr_decay_iters that decays to min_lr
warmup_iters = 100  # iterations of linear warmup
lr_decay_iters = 0  # the schedule reaches min_lr here (0 = at max_iters): a run stopped early by max_iters decays as planned
min_lr = 1e-4  # floor of the schedule (set it to learning_rate for a constant rate)
# system
device = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:1 | mps
dtype = "auto"  # auto (GPU: bfloat16 where it has it, else float16; CPU: bfloat16 autocast where a step timed faster, else float32) | float32 | bfloat16 | float16
compile = False  # torch.compile the model: faster on GPUs after a minute of compiling
matmul = "auto"  # CPU, float32: auto (time MKL and oneDNN at the run's layer shapes, take the faster per product) | mkl | onednn
parallelism = "ddp"  # under torchrun: ddp (every process holds the whole model) | fsdp (each holds 1/N of the weights, gradients and optimizer state: for models ddp cannot fit)
seed = 1337  # seeds model init (the same in every process), batches and dropout (process k uses seed + k)
# reliability
max_bad_steps = 5  # stop after this many non-finite steps in a row
# ---- end of defaults ----------------------------------------------------------
DEFAULTS = {name: value for name, value in globals().items()
            if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
HELP = flags.comments_of(__file__)  # --help shows the comment beside each default
# the model's keys: every field of GPTConfig but vocab_size (the dataset's), with the same defaults
MODEL_KEYS = [field.name for field in dataclasses.fields(GPTConfig) if field.name != "vocab_size"]


class TrainError(flags.UserError):
    """A run that cannot go on (failing steps, a failed save): one line, no traceback."""


def read_config(argv, given=None):
    """The defaults, then each config file in order, then each --key=value, checked: a namespace.
    given, a set, receives the keys that a config file or a flag set."""
    return SimpleNamespace(**flags.parse(argv, DEFAULTS, HELP, CHECKS, program="train.py", config_files=True,
                                         relations=RELATIONS, given=given))


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What the loop carries, made once by build_run. Only iter_num, best_val_loss,
    evals_since_best, the keys the run fits and the budget's clock change as the loop goes."""
    cfg: SimpleNamespace  # the checked config (read_config); the run may fit some keys: `fitted`
    runtime: SimpleNamespace  # rank, world_size, is_main, device, dtype, autocast, peak_flops (owngpt/runtime.py)
    log: RunLog  # prints on rank 0; metrics.jsonl, curves.svg and wandb
    stop: object  # a threading.Event set by SIGTERM or SIGINT: finish the step, save, exit
    data: SimpleNamespace  # windows and eval_batches per split, byte_lengths, encoding, tokenizer_info, generator
    raw_model: GPT  # the parameters: state_dict, clipping, sampling
    model: torch.nn.Module  # raw_model, compiled when asked: what evaluation runs
    train_model: torch.nn.Module  # model, wrapped in DDP under torchrun (FSDP shards model itself): what training runs
    optimizer: torch.optim.Optimizer  # AdamW, or owngpt.optimizers.MuonAndAdamW
    scaler: torch.amp.GradScaler | None  # float16 only: scales the loss so small gradients survive
    budget: TimeBudget  # the clock, max_time, the last evaluation's duration
    timer: StepTimer = dataclasses.field(default_factory=StepTimer)  # step times between log lines
    iter_num: int = 0  # iterations done (optimizer steps, skipped ones included)
    best_val_loss: float = math.inf  # the lowest val loss so far: best.pt's
    evals_since_best: int = 0  # evaluations since best_val_loss fell: patience's count
    # the keys the run set itself (max_iters to max_time or to patience, dropout to the data):
    # checkpoints carry them, so a resumed run goes on with them
    fitted: dict = dataclasses.field(default_factory=dict)
    data_keys: tuple = ()  # DATA_DEFAULTS' keys the user left to the data, until the run sets them
    speed: str = ""  # what the run does to be faster on this device and why, as the plan says it

    def fit(self, key, value):
        """Set a key of the config as the run decided it, for the rest of the run and its resumes."""
        setattr(self.cfg, key, value)
        self.fitted[key] = value
        if key == "dropout":
            self.raw_model.set_dropout(value)
        if key == "weight_decay":
            set_weight_decay(self.optimizer, value)

    @property
    def tokens_per_iter(self):  # over all micro-steps and processes
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.gradient_accumulation_steps


def build_run(cfg, given=frozenset()):
    """Everything the loop needs: data, model, optimizer, and the restored state on resume.
    Every check that can fail runs before out_dir is touched. given: the keys the user set."""
    budget = TimeBudget(cfg.max_time, cfg.max_iters)  # the clock starts now
    runtime = setup_runtime(cfg)
    stop = install_stop_handlers(runtime)
    folder = open_folder(cfg.dataset)
    with dataset_errors():
        meta = read_meta(folder)
    restarted = continue_after_restart(cfg, runtime)
    path, checkpoint = checkpoint_to_start(cfg, runtime)
    resuming = cfg.init_from == "resume" and not cfg.eval_only
    # a resumed run goes on with the values it fitted, but for a data default the user now sets
    fitted = {key: value for key, value in checkpoint["fitted"].items()
              if not (key in DATA_DEFAULTS and key in given)} if resuming else {}
    vars(cfg).update(fitted)
    if restarted:
        check_same_run(checkpoint, path, cfg, DEFAULTS)
    vocab_size = meta["tokenizer"]["vocab_size"]
    model_config = (GPTConfig(**checkpoint["model_config"]) if cfg.eval_only else
                    GPTConfig(**{key: getattr(cfg, key) for key in MODEL_KEYS}, vocab_size=vocab_size))
    if checkpoint is not None:
        grown_from = None if cfg.eval_only else add_chat_tokens(checkpoint, path, meta["tokenizer"], runtime.is_main)
        check_checkpoint_fits(checkpoint, path, model_config, meta["tokenizer"], folder, text="chat" not in meta)
    with dataset_errors():
        windows = {split: load_windows(folder, meta, split, model_config.block_size) for split in SPLITS}
        encoding = load_tokenizer(folder, meta["tokenizer"])
    tasks = load_tasks(cfg.eval_tasks, cfg.eval_task_items, encoding, cfg.init_from, runtime)
    if runtime.is_main and not cfg.eval_only:
        prepare_out_dir(Path(cfg.out_dir), folder, meta["tokenizer"], resuming)

    torch.manual_seed(cfg.seed)  # the same init on every rank: FSDP shards what each rank built
    raw_model = GPT(model_config)
    for seed_with in (random.seed, np.random.seed) + ((torch.manual_seed,) if runtime.rank else ()):
        seed_with(cfg.seed + runtime.rank)  # dropout masks of its own; rank 0 draws on, as one process does
    if checkpoint is not None and "rows_from" not in checkpoint:  # else each rank reads its rows once sharded
        raw_model.load_state_dict(grown_weights(checkpoint["model"], raw_model, grown_from) if grown_from
                                  else checkpoint["model"])
    if runtime.is_main and not cfg.eval_only:
        check_free_space(Path(cfg.out_dir), raw_model, cfg.keep_last)
    trained = (checkpoint or {}).get("fitted", {}) if cfg.eval_only else fitted if resuming else None
    chosen, speed = cpu.speed_up(raw_model, cfg, runtime, trained)  # on a CPU: timed choices
    train_model, model = wrap_model(raw_model, cfg.parallelism, runtime, cfg.compile)  # owngpt/parallel.py
    data = SimpleNamespace(
        windows=windows, encoding=encoding, tokenizer_info=meta["tokenizer"], tasks=tasks, chat=meta.get("chat"),
        train_tokens=meta["splits"]["train"]["tokens"],
        eval_batches={split: split_windows.fixed_batch_ids(cfg.eval_iters, cfg.batch_size)
                      for split, split_windows in windows.items()},
        byte_lengths=torch.tensor(token_byte_lengths(encoding), dtype=torch.int64, device=runtime.device),
        generator=torch.Generator().manual_seed(cfg.seed + runtime.rank))  # draws the training batches
    optimizer = build_optimizer(raw_model, cfg.optimizer, cfg.learning_rate, cfg.muon_lr, cfg.weight_decay,
                                (cfg.beta1, cfg.beta2), runtime.device.type,
                                None if resuming and saved_before_embedding_lr(checkpoint) else cfg.embedding_lr)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.dtype == torch.float16 else None
    # a resumed run that set its data defaults already keeps them, also one from before weight_decay was one
    decided = resuming and any(key in checkpoint["fitted"] for key in DATA_DEFAULTS)
    run = Run(cfg=cfg, runtime=runtime, log=None, stop=stop, data=data, raw_model=raw_model, model=model,
              train_model=train_model, optimizer=optimizer, scaler=scaler, budget=budget, fitted=fitted,
              data_keys=() if decided else tuple(key for key in DATA_DEFAULTS if key not in given),
              speed=speed)
    for key, value in chosen.items():
        run.fit(key, value)  # a resumed run computes as this one does
    if resuming:
        run.iter_num, run.best_val_loss, elapsed_before = restore_training_state(
            checkpoint, path, raw_model, optimizer, cfg.optimizer, scaler, data.generator, runtime)
        run.evals_since_best = checkpoint["evals_since_best"]
        budget.resumed(elapsed_before)
    run.log = RunLog(cfg, runtime, run.iter_num if resuming else None)
    return run


def batch(windows, window_ids, device):
    """Inputs and targets (len(window_ids), block_size), int64 on device; a chat dataset's
    targets are -1 where the loss does not count (all but the assistant's tokens)."""
    arrays = (torch.from_numpy(np.ascontiguousarray(part)) for part in windows.inputs_and_targets(window_ids))
    return [part.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else part.to(device)
            for part in arrays]


# ----------------------------------------------------------------------------- the loop
def train(run):
    """The loop: step, log, evaluate and checkpoint; stop on request or on repeated bad steps."""
    cfg, data = run.cfg, run.data
    run.log.plan(run.raw_model, cfg, run.runtime, run.speed or None)
    if cfg.max_time and run.iter_num < TIMED_ITERATIONS[1]:
        run.log.print(f"data: {data.train_tokens:,} train tokens; how many times the run reads them is known "
                      f"once iterations {TIMED_ITERATIONS[0] + 1}-{TIMED_ITERATIONS[1]} are timed")
    else:
        set_from_data(run)
    if data.chat:  # owngpt/dataset.py: ChatRows
        rows = data.windows["train"]
        run.log.print(f"chat: {rows.conversations:,} train conversations in {rows.count:,} rows of {cfg.block_size + 1} "
                      f"tokens ({rows.filled:.0%} filled{f'; {rows.cut:,} longer than a row, cut' if rows.cut else ''}); "
                      "the loss counts the assistant's tokens")
    if run.iter_num == 0:
        run_evaluation(run)  # the starting point of the curves
    train_windows = data.windows["train"]
    next_batch = lambda: batch(train_windows, torch.randint(train_windows.count, (cfg.batch_size,),
                                                            generator=data.generator).numpy(), run.runtime.device)
    micro_steps = cfg.gradient_accumulation_steps // run.runtime.world_size
    bad_in_a_row = skipped_total = 0
    run.budget.start_loop(run.iter_num)
    while run.iter_num < cfg.max_iters:
        lr = set_learning_rates(run.optimizer, run.iter_num, cfg)
        started = time.perf_counter()
        loss = forward_backward(run.train_model, next_batch, micro_steps, run.runtime.autocast, run.scaler,
                                isinstance(run.train_model, DistributedDataParallel))
        loss, grad_norm, skipped, stop = optimizer_step(run, loss, run.stop.is_set())
        run.iter_num += 1
        step_seconds = time.perf_counter() - started
        run.timer.add(step_seconds)
        fitted = run.budget.fit(run.iter_num, step_seconds, cfg, run.runtime)  # max_time: rank 0's figure
        if fitted:
            run.fit("max_iters", fitted)
            run.log.print(f"max_time={cfg.max_time:g}s: {run.budget.seconds_per_iter * 1000:.0f} ms/iter and "
                          f"{run.budget.eval_seconds:.1f}s per evaluation fit max_iters={cfg.max_iters}")
            if run.iter_num == TIMED_ITERATIONS[1]:  # the first fit: now the reads are known
                set_from_data(run)
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
        if at_eval:
            run.evals_since_best = 0 if improved else run.evals_since_best + 1
            ending = patience_ending(cfg, run.iter_num, run.evals_since_best, run.best_val_loss)
            if ending:  # patience ran out: fit the run's end (owngpt/optimizers.py)
                for key, value in ending[0].items():
                    run.fit(key, value)
                run.log.print(ending[1])
        if (at_eval or stop) and bad_in_a_row == 0:  # never save while steps are failing
            save_checkpoint(run, improved)
        if stop:
            run.log.print(f"stopped at iteration {run.iter_num}: continue with --init_from=resume")
            break
    run.log.print(f"done: iteration {run.iter_num} in {duration(run.budget.elapsed())}, "
                  f"{run.iter_num * run.tokens_per_iter:,} tokens seen, {skipped_total} steps skipped, "
                  f"peak memory {peak_memory()}")


def set_from_data(run):
    """Say how many times the run reads the train split, and set from it the keys the user
    left to the data (owngpt/epochs.py)."""
    reads = epochs(run.cfg.max_iters, run.tokens_per_iter, run.data.train_tokens)
    chosen = {key: DATA_DEFAULTS[key](reads) for key in run.data_keys}
    for key, value in chosen.items():
        run.fit(key, value)
    run.data_keys = ()
    run.log.print(reads_line(reads, run.data.train_tokens, run.cfg.max_iters, run.tokens_per_iter, chosen))


def forward_backward(model, next_batch, micro_steps, autocast, scaler, is_ddp):
    """Accumulate the gradients of micro_steps batches; return their mean loss (a tensor).
    DDP averages gradients across processes in backward; no_sync skips that on all but the last
    micro-step. FSDP reduce-scatters them at every one, so each rank keeps only its share."""
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
    params = [p for group in run.optimizer.param_groups for p in group["params"]]  # not a walk of the modules each step
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    grad_norm = clip_gradients(params, run.cfg.grad_clip if run.cfg.grad_clip > 0 else math.inf)
    # with a loss scaler, inf gradients are its normal overflow signal: scaler.step skips those itself
    not_finite = ~torch.isfinite(loss) if run.scaler else ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    votes = torch.stack([loss.float(), not_finite.float(), torch.tensor(float(stop_requested), device=loss.device)])
    if run.runtime.world_size > 1:
        dist.all_reduce(votes)
    loss_sum, not_finite_count, stop_count = votes.tolist()
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


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, windows, batch_ids, byte_lengths, runtime):
    """Mean loss, next-token accuracy and bits per byte over the fixed batches; each rank
    takes every world_size-th batch (FSDP gathers the whole weights first) and the sums are all-reduced."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss in nats (summed over the counted targets), correct, targets, bytes
    with gathered(model):
        for ids in batch_ids[runtime.rank::runtime.world_size]:
            inputs, targets = batch(windows, ids, runtime.device)
            with runtime.autocast:
                logits, loss = model(inputs, targets)
            counted = targets[targets != -1]  # all but a chat dataset's untrained targets
            if counted.numel() == 0:  # rows of conversations cut before the assistant's turn: nothing to score
                continue
            totals[0] += loss.item() * counted.numel()
            totals[1] += (logits.argmax(dim=-1)[targets != -1] == counted).sum().item()
            totals[2] += counted.numel()
            totals[3] += byte_lengths[counted].sum().item()
    model.train()
    totals = torch.tensor(totals, dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(totals)
    loss_nats, correct, tokens, text_bytes = totals.tolist()
    return {"loss": loss_nats / tokens, "acc": correct / tokens, "bpb": loss_nats / math.log(2) / max(text_bytes, 1)}


def run_evaluation(run):
    """Evaluate val and train on their fixed batches; log, sample, redraw curves.svg; return
    True if val loss is a new best."""
    started, data = time.perf_counter(), run.data
    val, on_train = (evaluate(run.model, data.windows[split], data.eval_batches[split], data.byte_lengths, run.runtime)
                     for split in ("val", "train"))
    tasks = evaluate_tasks(run.raw_model, data.tasks, run.runtime)  # {} without eval_tasks
    run.budget.eval_seconds = time.perf_counter() - started
    perplexity = math.exp(min(val["loss"], 700))
    run.log.print(f"eval at iter {run.iter_num}: val loss {val['loss']:.4f} (perplexity {perplexity:.2f}, "
                  f"accuracy {val['acc']:.1%}, {val['bpb']:.3f} bits/byte) | train loss {on_train['loss']:.4f} | "
                  f"gap {val['loss'] - on_train['loss']:+.4f} | {run.budget.eval_seconds:.1f}s{tasks_line(tasks)}")
    run.log.write({"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter,
                   "elapsed_s": run.budget.elapsed(), "val_loss": val["loss"], "val_ppl": perplexity,
                   "val_acc": val["acc"], "val_bpb": val["bpb"], "train_loss": on_train["loss"], **task_metrics(tasks)})
    if run.cfg.sample_every_eval and math.isfinite(val["loss"]):  # NaN weights cannot sample
        run.budget.eval_seconds += run.log.sample(run.raw_model, run.data.encoding, run.cfg.seed, run.runtime.device,
                                                  run.iter_num, run.budget.elapsed, data.chat and data.chat["question"])
    run.log.draw_curves()
    improved = run.iter_num > 0 and val["loss"] < run.best_val_loss
    if improved:
        run.best_val_loss = val["loss"]
    return improved


# ----------------------------------------------------------------------------- checkpoints and logs
def save_checkpoint(run, is_best):
    """Every rank contributes its random states; rank 0 writes, or each rank its rows (the keys: owngpt/checkpoint.py).
    It is taken between iterations, after the evaluation, which draws no random numbers, so a
    resumed run starts where this one would have gone on."""
    states = gather_from_ranks(rng_states(run.data.generator, run.runtime.device), run.runtime)
    sharded = run.cfg.sharded_checkpoint  # every rank writes its rows, else rank 0 writes the whole state
    model_state, optimizer_state = states_to_save(run.raw_model, run.optimizer, whole=not sharded)
    if not (run.runtime.is_main or sharded):
        return
    checkpoint = {  # under FSDP too, read back as the whole states of one process: one format for every reader
        "model": model_state, "model_config": dataclasses.asdict(run.raw_model.config),
        "optimizer": optimizer_state, "scaler": run.scaler.state_dict() if run.scaler else None,
        "iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "config": vars(run.cfg),
        "tokenizer": run.data.tokenizer_info, "rng": states, "data": {"world_size": run.runtime.world_size},
        "elapsed_s": run.budget.elapsed(), "fitted": run.fitted, "evals_since_best": run.evals_since_best,
        "chat": bool(run.data.chat),  # fine-tuned on conversations: chat.py talks to it
    }
    try:
        write = write_sharded_checkpoint if sharded else write_checkpoint
        write(Path(run.cfg.out_dir), checkpoint, run.cfg.keep_last, is_best)
    except OSError as error:  # most often a full disk
        raise TrainError(f"saving iteration {run.iter_num} into {run.cfg.out_dir} failed: {error.strerror or error}. "
                         f"The checkpoints recorded in {MANIFEST_FILE} are intact: make room, then continue "
                         "with --init_from=resume") from None


def main(argv):
    """Read the config, build the run, train it (or evaluate it, with eval_only); one line on errors."""
    try:
        given = set()
        cfg = read_config(argv, given)
        run = build_run(cfg, given)
        if cfg.eval_only:
            val = evaluate(run.model, run.data.windows["val"], run.data.eval_batches["val"], run.data.byte_lengths,
                           run.runtime)
            tasks = evaluate_tasks(run.raw_model, run.data.tasks, run.runtime)
            run.log.print(f"{cfg.init_from} on {cfg.dataset}: val loss {val['loss']:.4f} | perplexity "
                          f"{math.exp(min(val['loss'], 700)):.2f} | accuracy {val['acc']:.1%} | "
                          f"{val['bpb']:.3f} bits/byte{tasks_line(tasks)}")
        else:
            train(run)
        run.log.finish()
        if dist.is_initialized():
            dist.barrier()  # no process leaves while another may still be saving or using the group
    except flags.UserError as error:
        leave(f"error: {error}")
    finally:
        release_out_dirs()  # for a next run in this process; a process that ends releases them anyway
    leave(None)


if __name__ == "__main__":
    main(sys.argv[1:])
