"""What a run costs before it starts: memory per GPU, time and dollars on the GPUs people rent,
and the other way round, the largest model a budget trains well. plan.py prints it; train.py's
plan line and its ETA use the same functions, so they cannot disagree.

    model = meta_model(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    parts = memory_per_gpu(model, batch_size=16, optimizer="adamw", half=True)   # bytes: weights, ...
    seconds = seconds_per_iter(flops_per_iter(model, 65_536, "adamw"), gpus=1, peak_flops=989e12, mfu=0.4)

Memory is what a training step holds at its peak (the model here is checked against torch's
allocator on CPU: tests/test_plan.py). Time is the FLOPs a step does / (GPUs x the datasheet's
peak x MFU), where MFU, the share of the peak a run reaches, is the one guess: 40% unless told.
The FLOPs include checkpointing's second forward and Muon's Newton-Schulz iteration; the log
line's MFU counts the model's alone (PaLM's definition), so it reads lower than the plan's
where those are large, at the same speed.
"""
import dataclasses
import re

import torch

from model import GPT, GPTConfig, padded_vocab_size
from owngpt.optimizers import NS_STEPS

MFU = 0.4  # an assumption, not a measurement: no GPU run is measured here yet; a run's log line says its own
PRICES_DATED = "mid-2025"  # when the example prices below were typical


@dataclasses.dataclass(frozen=True)
class Card:
    name: str  # as the plan prints it and --card takes it
    pattern: str  # a regex searched in torch.cuda.get_device_name
    memory_gb: float
    peak_flops: float  # dense bf16 (T4: fp16) tensor FLOP/s with fp32 accumulation, without 2:4 sparsity
    usd_per_hour: float  # an EXAMPLE on-demand price per GPU-hour (PRICES_DATED); never a quote


# From the vendors' datasheets. Patterns are anchored with $ where a longer name is another card
# (A10 / A100 / A10G, L4 / L40S, RTX 4090 / RTX 4090 D). Prices: examples of on-demand listings,
# which vary by provider, region and month by 2x and more: pass your own with --usd_per_gpu_hour.
CARDS = [
    Card("H200", r"H200$", 141, 989e12, 3.50),  # SXM
    Card("H100", r"H100( 80GB HBM3| SXM|$)", 80, 989e12, 2.50),  # SXM; the NVL card is not here
    Card("H100 PCIe", r"H100 PCIe", 80, 756e12, 2.00),
    Card("A100 80GB", r"A100.*80GB", 80, 312e12, 1.60),  # SXM and PCIe alike
    Card("A100 40GB", r"A100", 40, 312e12, 1.20),
    Card("L40S", r"L40S$", 48, 362e12, 0.90),
    Card("A10", r"A10$", 24, 125e12, 0.75),
    Card("L4", r"L4$", 24, 121e12, 0.50),
    Card("RTX 4090", r"RTX 4090$", 24, 165.2e12, 0.40),  # GeForce: fp32 accumulation at half the fp16-accumulate rate
    Card("RTX 3090", r"RTX 3090$", 24, 71e12, 0.25),
    Card("T4", r"T4$", 16, 65e12, 0.35),  # no bfloat16: train.py runs float16 with a loss scaler
]
APPLE_NOTE = ("Apple M-series (device=mps): unified memory shared with the system, a few to ~30 TFLOP/s "
              "(no bf16 datasheet figure to plan from); time a few iterations instead")
CAPACITIES_GB = (24, 40, 48, 80, 141)  # the memory sizes rented cards come in
LAUNCH_BOUND_SECONDS = 0.02  # below this per iteration, a GPU waits on kernel launches more than it computes
USABLE = 0.9  # the CUDA context, kernels' workspace and the allocator's fragmentation take the rest

# Bytes the backward pass keeps per token and layer, in units of n_embd: (float32, bfloat16 autocast).
# Counted on the tensors autograd saves (saved_tensors_hooks) on CPU; tests/test_plan.py checks
# the totals against torch's allocator. The structure is Korthikanti et al. 2022 ("Reducing
# activation recomputation in large transformer models", section 4): 34 bytes per n_embd for
# GPT-2's layer in fp16, plus 5 x heads x block_size for the attention matrix, which
# scaled_dot_product_attention never keeps (it saves q, k, v, its output and a log-sum-exp, on
# CUDA as on CPU). GPT-2's layer here keeps 36 under autocast; the modern one more: QK-norm and
# rotary make copies of q and k, and its norms run in float32.
LAYER_BYTES = {"gpt2": (64, 36), "modern": (77, 51)}
VALUE_EMBEDDING_BYTES = (4, -4)  # the layer's value lookup; under autocast its sum with v replaces a copy
HEAD_BYTES = {"gpt2": (8, 6), "modern": (12, 10)}  # the final norm and the head's input, per token, in n_embd
# Per token and vocabulary entry at the step's peak, the start of the loss's backward: the logits
# the caller holds, the log-softmax the loss keeps, the gradient coming in and the one going out.
# (float32, autocast: the head's output is bfloat16, the loss computes in float32.)
LOGITS_BYTES = (16, 14)
KEPT_PER_CHECKPOINTED_LAYER = 4  # gradient_checkpointing keeps each block's float32 input (+ its value lookup)


def meta_model(config: GPTConfig) -> GPT:
    """The GPT on the meta device: shapes without memory, so a 1.5B model is counted in
    milliseconds; num_params and flops_per_token are model.py's own."""
    with torch.device("meta"), NoDraws():
        return GPT(config)


class NoDraws(torch.overrides.TorchFunctionMode):
    """Skips normal_ (the initialisation's draws): on the meta device there is nothing to draw,
    and its meta kernel imports torch's compiler, which doubles a plan's time."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def card_named(name):
    """The card of the table called name (any case), or None."""
    return next((card for card in CARDS if card.name.lower() == name.lower()), None)


def card_of_device(device_name):
    """The card behind a torch.cuda.get_device_name ("NVIDIA A100-SXM4-80GB"), or None: no MFU
    beats a guessed one."""
    return next((card for card in CARDS if re.search(card.pattern, device_name)), None)


def run_summary(model, cfg, processes):
    """The run in two lines: parameters, tokens, tokens per parameter, FLOPs."""
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    params, total_tokens = model.num_params(), tokens_per_iter * cfg.max_iters
    return [f"plan: {params / 1e6:,.2f}M parameters | {tokens_per_iter:,} tokens/iter ({cfg.batch_size} x "
            f"{cfg.block_size} tokens x {cfg.gradient_accumulation_steps} micro-steps, over {processes} "
            f"process{'es' if processes > 1 else ''})",
            f"      {cfg.max_iters:,} iterations = {total_tokens / 1e6:,.1f}M tokens = {total_tokens / params:.1f} "
            f"tokens per parameter (Chinchilla-optimal: ~20) | {model.flops_per_token() * total_tokens:.2e} FLOPs"]


# ----------------------------------------------------------------------------- memory
def memory_per_gpu(model, batch_size, optimizer, half, gradient_checkpointing=False, gpus=1, parallelism="ddp"):
    """Bytes one GPU (or process) holds at a training step's peak, by part: weights, gradients,
    optimizer, ddp_buckets, activations, and total. Weights and gradients are float32 (autocast computes in
    half precision from float32 masters, keeping a half copy of each matrix for backward);
    AdamW keeps two float32 moments per parameter, Muon one momentum per hidden matrix. FSDP
    (parallelism=fsdp: torch's fully_shard per block, owngpt/parallel.py) shards the first three
    over the GPUs and gathers a block's weights in the compute dtype while it runs, the next one
    prefetched, and its full gradient until the reduce-scatter."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    hidden = sum(p.numel() for p in model.parameter_groups(hidden_matrices_apart=True)[0])
    moments = 8 * params - (4 * hidden if optimizer == "muon" else 0)
    sharded = parallelism == "fsdp" and gpus > 1
    share = gpus if sharded else 1
    block_params = sum(p.numel() for p in model.transformer.h[0].parameters())
    parts = {
        "weights": (4 * params / share + (2 * matrices if half and not sharded else 0)
                    + (2 * (2 if half else 4) * block_params if sharded else 0)),
        "gradients": 4 * params / share + (4 * block_params if sharded else 0),
        "optimizer": moments / share,
        "ddp_buckets": 4 * params if gpus > 1 and not sharded else 0,  # DDP all-reduces a flat copy of the gradients
        "activations": batch_size * activation_bytes_per_sequence(c, half, gradient_checkpointing),
    }
    # The activations peak at the start of backward, before any gradient exists (zero_grad sets
    # them to None); the gradients peak at its end, when the activations are gone.
    parts["total"] = (parts["weights"] + parts["optimizer"] + parts["ddp_buckets"]
                      + max(parts["activations"], parts["gradients"]))
    return parts


def activation_bytes_per_sequence(config, half, gradient_checkpointing):
    """Bytes kept for backward by one sequence of block_size tokens, at the step's peak."""
    c, dtype = config, 1 if half else 0
    layer = LAYER_BYTES[c.block][dtype] + (VALUE_EMBEDDING_BYTES[dtype] if c.value_embeddings else 0)
    head = HEAD_BYTES[c.block][dtype] * c.n_embd + LOGITS_BYTES[dtype] * padded_vocab_size(c.vocab_size)
    if gradient_checkpointing:
        # each block keeps its input; one block's insides at a time are recomputed in backward,
        # after the loss's peak has passed
        kept = KEPT_PER_CHECKPOINTED_LAYER * (2 if c.value_embeddings else 1) * c.n_embd * c.n_layer
        return c.block_size * (kept + max(layer * c.n_embd, head))
    return c.block_size * (layer * c.n_embd * c.n_layer + head)


def parallelism_advice(memory, parallelism, capacity_bytes):
    """What to do when the run under this parallelism does not fit a card of capacity_bytes
    (memory: {kind: memory_per_gpu's parts}); None when it fits."""
    usable = capacity_bytes * USABLE
    if memory[parallelism]["total"] <= usable:
        return None
    fsdp = memory.get("fsdp")
    if parallelism == "ddp" and fsdp and fsdp["total"] <= usable:
        return (f"under ddp this does not fit the device's {memory_text(capacity_bytes)}; --parallelism=fsdp "
                f"needs ~{memory_text(fsdp['total'])} per process")
    return (f"this does not fit the device's {memory_text(capacity_bytes)}: lower batch_size and raise "
            "gradient_accumulation_steps, or set gradient_checkpointing=True" +
            (", or run on more GPUs with --parallelism=fsdp" if parallelism == "ddp" else ""))


def largest_batch(model, capacity_bytes, **memory_options):
    """The largest micro-batch (batch_size) whose step fits in capacity_bytes; 0 if none does."""
    fits = lambda batch: memory_per_gpu(model, batch, **memory_options)["total"] <= capacity_bytes
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


# ----------------------------------------------------------------------------- time and cost
def seconds_per_iter(flops_per_iter, gpus, peak_flops, mfu):
    """An iteration's FLOPs over what the GPUs deliver at this MFU."""
    return flops_per_iter / (gpus * peak_flops * mfu)


def optimizer_flops(model, optimizer):
    """FLOPs of an optimizer step, which every process does whole and 6N does not count:
    Muon's Newton-Schulz iteration on each hidden matrix, m x n with m <= n once turned, is
    NS_STEPS x (x x^T, gram^2, then that times x) = NS_STEPS x (4 m^2 n + 2 m^3). At a small
    batch it costs as much as the forward and backward (AdamW's elementwise update: ~0)."""
    if optimizer != "muon":
        return 0
    shapes = (sorted(p.shape) for p in model.parameter_groups(hidden_matrices_apart=True)[0])
    return sum(NS_STEPS * (4 * m * m * n + 2 * m**3) for m, n in shapes)


def recomputed_flops_per_token(model):
    """What gradient checkpointing adds: the blocks' forward again, in backward. torch's
    non-reentrant checkpoint stops once the last tensor backward needs is recomputed, so each
    block's last multiply (the MLP's output projection, a third of a gpt2 block's weights) is
    not redone; the attention's scores and weighted sum are (4 C T per token and layer)."""
    c = model.config
    blocks = model.transformer.h
    multiplied = sum(p.numel() for p in blocks.parameters() if p.dim() == 2)
    not_redone = sum(block.mlp.c_proj.weight.numel() for block in blocks)
    return 2 * (multiplied - not_redone) + 4 * c.n_layer * c.n_embd * c.block_size


def flops_per_iter(model, tokens_per_process, optimizer, gradient_checkpointing=False):
    """One process's FLOPs per iteration: 6N + attention per token (model.flops_per_token), the
    blocks' recomputed forward under checkpointing, the optimizer's."""
    per_token = model.flops_per_token() + (recomputed_flops_per_token(model) if gradient_checkpointing else 0)
    return per_token * tokens_per_process + optimizer_flops(model, optimizer)


def evaluations(max_iters, eval_interval, start=0):
    """Evaluations train.py runs after iteration start: every eval_interval and at max_iters
    (and the one before the first iteration, on a fresh run)."""
    done = start // eval_interval
    return max_iters // eval_interval - done + (max_iters % eval_interval > 0) + (start == 0)


def run_seconds(iterations, seconds_per_iteration, evaluation_count, seconds_per_evaluation):
    """The wall time of the iterations and evaluations ahead: the plan's prediction and the log's ETA."""
    return iterations * seconds_per_iteration + evaluation_count * seconds_per_evaluation


def predicted_seconds(model, cfg, gpus, peak_flops, mfu):
    """(seconds per iteration, seconds for the whole run) of the run cfg describes on gpus
    processes. An evaluation is a forward pass (1/3 of training's FLOPs per token) over
    eval_iters batches of each split."""
    tokens_per_process = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps / gpus
    per_iter = seconds_per_iter(flops_per_iter(model, tokens_per_process, cfg.optimizer, cfg.gradient_checkpointing),
                                1, peak_flops, mfu)
    eval_tokens = 2 * cfg.eval_iters * cfg.batch_size * cfg.block_size
    per_eval = seconds_per_iter(model.flops_per_token() / 3 * eval_tokens, gpus, peak_flops, mfu)
    return per_iter, run_seconds(cfg.max_iters, per_iter, evaluations(cfg.max_iters, cfg.eval_interval), per_eval)


# ----------------------------------------------------------------------------- a budget
def compute_optimal_shape(flops, tokens_per_param, vocab_size, block, block_size):
    """The deepest model of GPT-2 small's proportions (width 64 x depth, heads of 64) whose
    training on tokens_per_param tokens per parameter (Hoffmann et al. 2022, Chinchilla: ~20)
    fits in flops. Returns (model, tokens), or (None, 0) if not even one layer does."""
    best = None, 0
    for depth in range(1, 200):
        model = meta_model(GPTConfig(n_layer=depth, n_head=depth, n_embd=64 * depth, block_size=block_size,
                                     vocab_size=vocab_size, block=block))
        tokens = tokens_per_param * model.num_params()
        if model.flops_per_token() * tokens > flops:
            return best
        best = model, tokens
    return best


def memory_text(count):
    """Bytes as MiB below a GiB, else GiB."""
    return f"{count / 2**20:.1f} MiB" if count < 2**30 else f"{count / 2**30:.2f} GiB"
