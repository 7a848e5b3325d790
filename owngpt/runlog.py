"""What a run records: log lines (printed by rank 0), metrics.jsonl, wandb, curves.svg, and
a short sample of text at each evaluation.

    log = RunLog(cfg, runtime, resumed_at=None)   # a new run starts a new metrics.jsonl
    log.print("eval at iter 100: ...")            # rank 0 prints
    log.write({"iter": 100, "val_loss": 3.9})     # one JSON object a line (and wandb)
    log.draw_curves()                             # rewrites out_dir/curves.svg (curves.py)
    log_step(run, loss, grad_norm, skipped, lr)   # train.py's line of a step, and its record
    seconds = log.sample(model, encoding, seed=1337, device=torch.device("cpu"), iteration=100, elapsed=clock)

A resumed run first drops the lines past the checkpoint it resumes, so every iteration is
recorded once, however often the run was stopped.
"""
import json
import math
import sys
import time
from pathlib import Path

import torch

from owngpt import costs, curves
from owngpt.chat import chat_token_ids, render_prompt
from owngpt.dataset import atomic_write
from owngpt.flags import UserError
from owngpt.parallel import gathered

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.svg"


class RunLog:
    """Prints (rank 0 only) and appends to metrics.jsonl (and wandb when asked)."""

    def __init__(self, cfg, runtime, resumed_at):
        self.is_main = runtime.is_main
        self.enabled = runtime.is_main and not cfg.eval_only
        self.path = Path(cfg.out_dir) / METRICS_FILE
        self.run_name = Path(cfg.out_dir).name
        self.wandb = None
        if not self.enabled:
            return
        if resumed_at is None:
            self.path.unlink(missing_ok=True)
        else:
            self.trim_after(resumed_at)
        if cfg.wandb_log:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb_log=True needs the wandb package: pip install wandb") from None
            self.wandb = wandb
            wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=vars(cfg))

    def trim_after(self, iteration):
        """Drop the lines past the resumed checkpoint (a run killed between checkpoints wrote
        them), so each iteration appears once, and a line cut short by a power loss."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["iter"] <= iteration:
                    kept.append(line)
            except (ValueError, KeyError):
                pass
        atomic_write(self.path, lambda file: file.write("".join(kept).encode()))

    def print(self, text):
        if self.is_main:
            print(text, flush=True)

    def write(self, record):
        if not self.enabled:
            return
        record = {key: (value if not isinstance(value, float) or math.isfinite(value) else None)
                  for key, value in record.items()}
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record, step=record["iter"])

    def plan(self, model, cfg, runtime, speed=None):
        """The cost of the run before it starts: parameters, tokens, FLOPs, memory per process,
        and on a GPU of the card table the time at costs.MFU (owngpt/costs.py, as plan.py prints);
        speed: what the run does to be faster on this device, and why."""
        kinds = ("ddp", "fsdp") if runtime.world_size > 1 else ("ddp",)  # one process shards nothing
        memory = {kind: costs.memory_per_gpu(model, cfg.batch_size, cfg.optimizer, runtime.dtype != torch.float32,
                                             cfg.gradient_checkpointing, runtime.world_size, kind) for kind in kinds}
        lines = costs.run_summary(model, cfg, runtime.world_size)
        for kind, parts in memory.items():
            lines.append(f"      memory per process ~{costs.memory_text(parts['total'])} at its peak"
                         + (f" under {kind}" if len(kinds) > 1 else "") + ": " + ", ".join(
                             f"{name} {costs.memory_text(parts[name])}" for name in ("weights", "gradients",
                                                                                    "optimizer", "activations")))
        if runtime.device.type == "cuda":
            advice = costs.parallelism_advice(memory, cfg.parallelism,
                                              torch.cuda.get_device_properties(runtime.device).total_memory)
            lines += [f"      {advice}"] if advice else []
        if runtime.peak_flops:
            seconds = costs.predicted_seconds(model, cfg, runtime.world_size, runtime.peak_flops, costs.MFU)[1]
            lines.append(f"      ~{duration(seconds)} at {costs.MFU:.0%} MFU, evaluations included")
        lines.append(f"      device {runtime.device}, {str(runtime.dtype).removeprefix('torch.')}, compile={cfg.compile}"
                     + (f"; {speed}" if speed else ""))
        self.print("\n".join(lines))

    def sample(self, model, encoding, seed, device, iteration, elapsed, question=None):
        """Print and record a sample (draw_sample), so the text can be seen going from noise to
        structure; returns the seconds it took. Every rank calls it, rank 0 alone draws: generation
        is local (no collective), and the other ranks wait for rank 0 at the next step's
        all-reduce. Under FSDP every rank first gathers the whole weights (a collective).
        elapsed() gives the run's seconds so far."""
        started = time.perf_counter()
        with gathered(model):
            if not self.is_main:
                return 0.0
            text = draw_sample(model, encoding, seed, device, question)
        seconds = time.perf_counter() - started
        asked = f'{one_line(question[-1]["content"])} -> ' if question else ""
        self.print(f'sample at iter {iteration}: {asked}"{one_line(text)}" | {seconds:.2f}s')
        self.write({"iter": iteration, "elapsed_s": elapsed(), "sample": text, "sample_s": seconds})
        return seconds

    def finish(self):
        if self.wandb:
            self.wandb.finish()  # its own exit hook may not run: train.leave ends a group with os._exit

    def draw_curves(self):
        """out_dir/curves.svg from every line so far: rank 0 draws it at each evaluation."""
        if self.enabled:
            curves.write(self.path.with_name(CURVES_FILE), [(self.run_name, curves.read_metrics(self.path.parent))])


def log_step(run, loss, grad_norm, skipped, lr):
    """train.py's log line and metrics.jsonl record of a step: loss, rate, speed, MFU (on GPUs it
    knows), ETA; once, after 5 timed steps, the whole run's estimated wall time. run: train.Run."""
    ms_per_iter = run.timer.take_ms()
    tokens_per_s = run.tokens_per_iter / (ms_per_iter / 1000)
    record = {"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter, "elapsed_s": run.budget.elapsed(),
              "loss": loss, "lr": lr, "grad_norm": grad_norm, "ms_per_iter": ms_per_iter,
              "tokens_per_s": tokens_per_s, "skipped": skipped}
    text = (f"iter {run.iter_num}/{run.cfg.max_iters}: loss {loss:.4f} | lr {lr:.2e} | {ms_per_iter:.0f} ms/iter | "
            f"{tokens_per_s:,.0f} tokens/s")
    if run.runtime.peak_flops:
        peak_flops = run.runtime.peak_flops * run.runtime.world_size
        record["mfu"] = run.raw_model.flops_per_token() * tokens_per_s / peak_flops
        text += f" | MFU {record['mfu']:.1%}"
    eta = run.budget.eta(run.iter_num, run.cfg.max_iters, run.cfg.eval_interval, ms_per_iter)
    run.log.print(text + f" | ETA {duration(eta)}" + (" | SKIPPED: loss or gradient not finite" if skipped else ""))
    run.log.write(record)
    if run.timer.timed_steps >= 5 and not run.timer.estimated:  # once, after 5 timed steps
        run.timer.estimated = True
        run.log.print(f"estimated wall time of the whole run on {run.runtime.device}: "
                      f"{duration(run.budget.elapsed() + eta)} ({ms_per_iter:.0f} ms/iter, "
                      f"{run.budget.eval_seconds:.1f}s per evaluation)")


# The sample at each evaluation: a few dozen tokens show the text taking shape, and cost a
# fraction of what the evaluation does (32 one-token steps against its thousands of tokens).
# Temperature 0.8 as sample.py's default; top_k 40 keeps an untrained model's long tail out.
SAMPLE_TOKENS, SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 32, 0.8, 40


@torch.no_grad()
def draw_sample(model, encoding, seed, device, question=None):
    """SAMPLE_TOKENS tokens of a fresh document (generated after end-of-text, as every
    training document starts), decoded; fewer when the model ends the document first. With a
    question (a chat dataset's messages, ending with the user's), the answer to it instead,
    until the model ends its turn.

    It must leave the training exactly as it was: it draws from a generator of its own,
    seeded with seed every time (so successive samples differ by what the model has learned,
    not by the draw), never from the global random state; the model is in eval mode, so
    dropout draws nothing, and goes back to train mode after."""
    generator = torch.Generator(device=device).manual_seed(seed)
    prompt = render_prompt(question, encoding) if question else [encoding.eot_token]
    stop = chat_token_ids(encoding)["end"] if question else encoding.eot_token
    model.eval()
    try:
        tokens = [int(token) for token in model.generate(torch.tensor([prompt], device=device), SAMPLE_TOKENS,
                                                          temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K,
                                                          generator=generator, stop_token=stop)]
    finally:
        model.train()
    return encoding.decode([token for token in tokens if token != stop])


def one_line(text):
    """text on one line, for the log: a newline shows as ⏎, other unprintable characters as
    Python escapes (\\t, \\x0c)."""
    return "".join("⏎" if char == "\n" else char if char.isprintable() else repr(char)[1:-1] for char in text)


def duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class StepTimer:
    """Mean wall time of the training steps between log lines (evaluations and saves
    excluded). A process's first step (allocation, compilation) counts only when it is alone."""

    def __init__(self):
        self.seconds, self.steps, self.timed_steps, self.first_step = 0.0, 0, 0, None
        self.estimated = False  # the whole run's wall time is estimated once, after 5 timed steps

    def add(self, seconds):
        if self.first_step is None:
            self.first_step = seconds
        else:
            self.seconds, self.steps, self.timed_steps = self.seconds + seconds, self.steps + 1, self.timed_steps + 1

    def take_ms(self):
        """Mean ms/iter since the last call."""
        mean = self.seconds / self.steps if self.steps else self.first_step
        self.seconds, self.steps = 0.0, 0
        return 1000 * mean


def peak_memory():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, max allocated)"
    try:
        import resource  # Unix only
    except ImportError:
        return "unknown on this OS"
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{max_rss / (2**30 if sys.platform == 'darwin' else 2**20):.2f} GiB (max RSS of this process)"
