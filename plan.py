"""What will it cost? The memory per GPU, the time and the dollars of a training run, before it starts.

    python plan.py config/train_gpt2_124m.py                         # the run a config describes
    python plan.py config/train_gpt2_124m.py --mfu=0.5 --card=H100 --usd_per_gpu_hour=2.1
    python plan.py config/train_gpt2_124m.py --budget_usd=100 --card=H100 --gpus=8   # the model $100 trains
    python plan.py config/train_gpt2_124m.py --card=H100 --gpus=16   # ... and the lines that launch it

It reads train.py's keys and config files as train.py does (the defaults from train.py's text),
and the keys below. Nothing trains and no data is read but the dataset's meta.json, for the
vocabulary. The arithmetic is owngpt/costs.py's, which train.py's own plan line and ETA use.
"""
import dataclasses
import math
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

from model import GPTConfig
from owngpt import costs, flags
from owngpt.dataset import DatasetError, open_folder, read_meta
from owngpt.runlog import duration

TRAIN = Path(__file__).resolve().parent / "train.py"
_NAMES_BEFORE_DEFAULTS = set(globals())
# ---- defaults ---------------------------------------------------------------
mfu = costs.MFU  # the share of the cards' peak FLOP/s the run reaches (an assumption: a run's log line shows its own)
card = ""  # one card of the table (H100, A100 80GB, RTX 4090...); empty = all of them (a budget: H100)
gpus = 0  # GPUs per run; 0 = show 1 and 8 (a budget: 8)
usd_per_gpu_hour = 0.0  # your price per GPU-hour; 0 = each card's example price (not a quote)
budget_usd = 0.0  # the other way round: the compute-optimal model this many dollars train on gpus x card
budget_hours = 0.0  # ... or this many hours
tokens_per_param = 20.0  # a budget's tokens per parameter: Chinchilla's compute-optimal ~20
vocab_size = 0  # the vocabulary; 0 = the dataset's meta.json, else GPTConfig's default
# ---- end of defaults ----------------------------------------------------------
PLAN_DEFAULTS = {name: value for name, value in globals().items()
                 if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
CHECKS = {"mfu": flags.all_of(flags.above(0), flags.between(0, 1)),
          "card": lambda name: None if not name or costs.card_named(name) else
          "one of " + ", ".join(card.name for card in costs.CARDS),
          **dict.fromkeys(("gpus", "vocab_size"), flags.at_least(0)),
          **dict.fromkeys(("usd_per_gpu_hour", "budget_usd", "budget_hours"), flags.at_least(0)),
          "tokens_per_param": flags.above(0)}


def read_config(argv):
    train_defaults = flags.defaults_of(TRAIN)
    defaults, helps = {**train_defaults, **PLAN_DEFAULTS}, {**flags.comments_of(TRAIN), **flags.comments_of(__file__)}
    return SimpleNamespace(**flags.parse(argv, defaults, helps, CHECKS, program="plan.py", config_files=True))


def vocabulary(cfg):
    """(vocab_size, where it came from)."""
    if cfg.vocab_size:
        return cfg.vocab_size, "--vocab_size"
    try:
        return read_meta(open_folder(cfg.dataset))["tokenizer"]["vocab_size"], f"dataset {cfg.dataset}'s meta.json"
    except DatasetError:
        return GPTConfig.vocab_size, (f"GPTConfig's default: no dataset {cfg.dataset!r} here; "
                                      "set --vocab_size (GPT-2's tokenizer: 50257)")


def model_of(cfg, vocab):
    fields = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(GPTConfig) if field.name != "vocab_size"}
    try:
        return costs.meta_model(GPTConfig(**fields, vocab_size=vocab))
    except (ValueError, AssertionError) as error:
        raise flags.UserError(f"this model cannot be built: {error}") from None


def memory_table(model, cfg, gpu_counts):
    """Memory per GPU by part, on 1 GPU and under DDP and FSDP on the most GPUs asked for."""
    columns = [(1, "ddp")] + [(count, kind) for count in gpu_counts if count > 1 for kind in ("ddp", "fsdp")][-2:]
    options = dict(optimizer=cfg.optimizer, half=cfg.dtype != "float32")
    parts = [costs.memory_per_gpu(model, cfg.batch_size, gpus=count, parallelism=kind, **options)
             for count, kind in columns]
    checkpointed = [costs.memory_per_gpu(model, cfg.batch_size, gpus=count, parallelism=kind,
                                         gradient_checkpointing=True, **options)["total"] for count, kind in columns]
    names = {"weights": "weights (+ bf16 copies)", "gradients": "gradients", "optimizer": f"{cfg.optimizer} state",
             "ddp_buckets": "DDP gradient buckets", "activations": "activations (peak)", "total": "total"}
    header = "".join(f"{(f'{count} GPU' if count == 1 else f'{count} GPUs {kind.upper()}'):>16}" for count, kind in columns)
    precision = "float32" if cfg.dtype == "float32" else "bfloat16 autocast"
    lines = [f"memory per GPU at batch_size={cfg.batch_size} x block_size={cfg.block_size}, {precision} "
             f"(FSDP: --parallelism=fsdp under torchrun):", f"  {'':30}{header}"]
    lines += [f"  {label:30}" + "".join(f"{costs.memory_text(part[key]):>16}" for part in parts) for key, label in names.items()]
    lines.append(f"  {'total, gradient_checkpointing':30}" + "".join(f"{costs.memory_text(total):>16}" for total in checkpointed))
    lines.append("  (the total takes the larger of activations and gradients: the activations peak as backward "
                 "starts, before any gradient exists)")
    lines.append(f"fits one GPU ({costs.USABLE:.0%} of the card; the largest batch_size without / with "
                 "gradient_checkpointing):")
    for size in costs.CAPACITIES_GB:
        capacity = size * 2**30 * costs.USABLE
        largest = [costs.largest_batch(model, capacity, gradient_checkpointing=checkpointing, **options)
                   for checkpointing in (False, True)]
        verdict = "fits" if largest[0] >= cfg.batch_size else f"batch_size={cfg.batch_size} does not fit"
        lines.append(f"  {size:>4} GB: {verdict:28} " + (f"largest {largest[0]} / {largest[1]}" if largest[1] else
                                                       "no batch does: the model and its optimizer state alone "
                                                       "do not fit (FSDP over several GPUs shards them)"))
    return lines


def time_table(model, cfg, cards, gpu_counts):
    """Time and cost of the run on each card, for each GPU count."""
    mfu_source = "assumed: no GPU run is measured here yet" if cfg.mfu == costs.MFU else "yours"
    price_source = ("your price" if cfg.usd_per_gpu_hour else
                    f"prices are examples of on-demand listings ({costs.PRICES_DATED}), not quotes: --usd_per_gpu_hour")
    lines = [f"time and cost at {cfg.mfu:.0%} MFU (--mfu, {mfu_source}); {price_source}",
             f"  {'card':11}{'TFLOP/s':>8}{'memory':>8}{'$/GPU-h':>9}"
             + "".join(f"{f'{count} GPU' + ('s' if count > 1 else '') + ': s/iter, run, cost':>37}" for count in gpu_counts)]
    too_small = False
    for card in cards:
        price = cfg.usd_per_gpu_hour or card.usd_per_hour
        row = f"  {card.name:11}{card.peak_flops / 1e12:>8.0f}{card.memory_gb:>6.0f}GB{price:>9.2f}"
        for count in gpu_counts:
            per_iter, seconds = costs.predicted_seconds(model, cfg, count, card.peak_flops, cfg.mfu)
            needed = costs.memory_per_gpu(model, cfg.batch_size, cfg.optimizer, cfg.dtype != "float32", gpus=count)
            fits = needed["total"] <= card.memory_gb * 2**30 * costs.USABLE
            too_small |= not fits
            row += f"{step_text(per_iter):>16}{duration(seconds):>10}{f'${seconds / 3600 * count * price:,.2f}':>10} "
            row += " " if fits else "*"
        lines.append(row)
    if too_small:
        lines.append(f"  * batch_size={cfg.batch_size} does not fit this card (DDP on several): lower it and raise "
                     "gradient_accumulation_steps, or set gradient_checkpointing=True")
    fastest = costs.predicted_seconds(model, cfg, gpu_counts[-1], max(card.peak_flops for card in cards), cfg.mfu)[0]
    if fastest < costs.LAUNCH_BOUND_SECONDS:
        lines.append(f"  a step of {fastest * 1000:.2f} ms of FLOPs is bound by kernel launches and Python, not by "
                     "FLOPs: expect it several times longer")
    lines += [f"  {count} GPUs need gradient_accumulation_steps={cfg.gradient_accumulation_steps} to be a multiple of "
              f"{count}" for count in gpu_counts if cfg.gradient_accumulation_steps % count]
    if cfg.max_time:
        lines.append(f"  max_time={cfg.max_time:g}s ends the run sooner if max_iters={cfg.max_iters:,} would take longer")
    lines.append(f"  {costs.APPLE_NOTE}")
    return lines


def step_text(seconds):
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def budget_lines(cfg, vocab):
    """The compute-optimal model a budget trains, as the flags to give train.py."""
    chosen = costs.card_named(cfg.card or "H100")
    count, price = cfg.gpus or 8, cfg.usd_per_gpu_hour or chosen.usd_per_hour
    hours = cfg.budget_hours or cfg.budget_usd / (count * price)
    flops = hours * 3600 * count * chosen.peak_flops * cfg.mfu
    lines = [f"budget: {duration(hours * 3600)} on {count} x {chosen.name} (${hours * count * price:,.2f} at "
             f"${price:.2f}/GPU-hour) at {cfg.mfu:.0%} MFU = {flops:.2e} FLOPs"]
    model, tokens = costs.compute_optimal_shape(flops, cfg.tokens_per_param, vocab, cfg.block, cfg.block_size)
    if model is None:
        return lines + ["  not enough for a one-layer model: raise the budget"]
    shape = model.config
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    lines.append(f"  compute-optimal at {cfg.tokens_per_param:g} tokens per parameter: {shape.n_layer} layers x "
                 f"{shape.n_embd} ({model.num_params() / 1e6:,.1f}M parameters), {tokens / 1e9:,.2f}B tokens "
                 f"(evaluations not counted)")
    lines.append(f"  --n_layer={shape.n_layer} --n_head={shape.n_head} --n_embd={shape.n_embd} "
                 f"--max_iters={math.ceil(tokens / tokens_per_iter)}  ({tokens_per_iter:,} tokens/iter as configured)")
    options = dict(optimizer=cfg.optimizer, half=cfg.dtype != "float32", gpus=count)
    needed = costs.memory_per_gpu(model, cfg.batch_size, **options)["total"]
    capacity = chosen.memory_gb * 2**30 * costs.USABLE
    if needed > capacity:
        largest = [costs.largest_batch(model, capacity, gradient_checkpointing=checkpointing, **options)
                   for checkpointing in (False, True)]
        lines.append(f"  batch_size={cfg.batch_size} needs {costs.memory_text(needed)} per GPU, more than a {chosen.name} "
                     f"has: the largest batch_size is {largest[0]} ({largest[1]} with gradient_checkpointing=True); raise "
                     "gradient_accumulation_steps to keep the tokens per iteration")
    return lines


GPUS_PER_NODE = 8  # what a cloud's or a cluster's largest nodes have
# SkyPilot's names of the cards whose name in the table is not theirs less its spaces
SKY_ACCELERATORS = {"H100 PCIe": "H100", "A100 80GB": "A100-80GB", "A100 40GB": "A100"}


def launch_lines(argv, cfg):
    """The lines that start this run on cfg.gpus cards of cfg.card: a SkyPilot managed job on
    whichever cloud has them, and a Slurm job (launch/), nodes of up to 8 GPUs."""
    per_node = min(cfg.gpus, GPUS_PER_NODE)
    if cfg.gpus % per_node:
        return [f"launch: {cfg.gpus} GPUs do not fill nodes of {per_node}: ask for a multiple of {per_node}"]
    card = costs.card_named(cfg.card)
    train_args = shlex.join(argument for argument in argv
                            if argument.split("=")[0].removeprefix("--") not in PLAN_DEFAULTS)
    return ["launch (README.md: On a cluster or a cloud):",
            f"  sky jobs launch launch/sky.yaml --gpus {SKY_ACCELERATORS.get(card.name, card.name.replace(' ', ''))}:"
            f"{per_node} --num-nodes {cfg.gpus // per_node} --env TRAIN_ARGS={shlex.quote(train_args)}",
            f"  sbatch --nodes={cfg.gpus // per_node} --gpus-per-node={per_node} launch/train_slurm.sbatch {train_args}"]


def main(argv):
    try:
        cfg = read_config(argv)
        vocab, source = vocabulary(cfg)
        model = model_of(cfg, vocab)
        gpu_counts = [cfg.gpus] if cfg.gpus else [1, 8]
        cards = [costs.card_named(cfg.card)] if cfg.card else costs.CARDS
        lines = [f"vocabulary {vocab:,} ({source})", *costs.run_summary(model, cfg, cfg.gpus or 1), "",
                 *memory_table(model, cfg, gpu_counts), "", *time_table(model, cfg, cards, gpu_counts)]
        if cfg.budget_usd or cfg.budget_hours:
            lines += ["", *budget_lines(cfg, vocab)]
        elif cfg.card and cfg.gpus:
            lines += ["", *launch_lines(argv, cfg)]
        print("\n".join(lines))
    except flags.UserError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
