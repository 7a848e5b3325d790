"""What makes a training step faster on a CPU, measured on the CPU that runs it.

    dtype, ratio = choose_dtype(model, batch_size, block_size)  # "bfloat16" where its step timed faster
    choice = choose_matmuls(model, rows=batch_size * block_size)  # "mkl", or per layer shape what won
    use_matmuls(model, choice)              # each linear layer multiplies through the library chosen
    use_byte_dropout(model)                 # dropout masks from random bytes, 8 to a draw

train.py applies them on a CPU (speed_up) and says in its plan line what it chose; model.py
knows none of it (its layers are nn.Linear). `--dtype=float32` or `--dtype=bfloat16` forces a
dtype, `--matmul=mkl` or `--matmul=onednn` a library.

bfloat16. Under bfloat16 autocast the matrix multiplies and the attention compute in bfloat16
while the weights, the optimizer and the loss stay float32, as train.py trains on a GPU. A CPU
with bfloat16 dot products (AVX512_BF16, AMX) runs the quick start's step faster with it; one
without them emulates them many times slower (RESULTS.md: bfloat16 on a CPU). So the model's
forward and backward are timed both ways, in turn, and bfloat16 is taken where it was clearly
faster; a step too small to time well stays float32.

The matrix multiplies. PyTorch multiplies float32 matrices on a CPU with MKL. oneDNN, also
inside PyTorch (torch.ops.mkldnn._linear_pointwise, which torch.compile's CPU backend uses
for inference), runs the same products twice as fast on an AMD Zen 5 core (MKL keeps its
widest kernels for Intel processors), a little faster on Zen 4, and slower for some products on
CPUs with AVX2 only (RESULTS.md: the CPU's matrix multiplies). So no CPU name decides: each
linear layer shape's three products (its output, its input's gradient, its weight's gradient)
are timed with both libraries at the run's own row count, in turn, and oneDNN takes a
product only where it was clearly faster; a tie stays with MKL, PyTorch's own path. The
choice is kept in the run's config (a fitted key), so a resumed run multiplies as it did.

Dropout. nn.Dropout draws its mask on a CPU with torch's bernoulli_, one draw of the Mersenne
Twister per element: at the quick start's shape 1.9 ms of a 2.5 ms forward and backward, and
nine of them a step slowed a small text's step from 159 to 180 ms. ByteDropout cuts 8 bytes
from each 64-bit draw and keeps an element where its byte is at least round(p * 256): the rate
rounded to 1/256 (0.2 drops 51/256 = 0.199), 0.7 ms forward and backward, the same on every
CPU (RESULTS.md: Own small text). GPUs keep nn.Dropout (their kernel draws and masks in one
pass), and so does torch.compile (its own kernels).

What else was measured and left out (RESULTS.md: The quick start on both kinds of CPU): the
loss computed a cache-sized piece of the logits at a time, the softmax's gradient made in
place of the logits and the head's product without its padding rows were no faster in the
whole step. torch.compile (train.py --compile) makes a step faster, but the whole quick start
ran fewer iterations with it than without (its first compiles took ~17 s), and it needs a C++
compiler: not a default.
"""
import functools
import statistics
import time

import torch
import torch.nn as nn

from owngpt.runtime import set_dtype

LIBRARIES = ("mkl", "onednn")
PRODUCTS = ("output", "input_grad", "weight_grad")
FASTER_BY = 0.95  # oneDNN takes a product only where its median time is below this fraction of MKL's
TIMED_FLOPS = 1.5e8  # each timed product is cut to about this many FLOPs (fewer rows), to choose well under a second
TIMINGS = 5  # timed calls of each product with each library, after one that is not timed
BF16_FASTER_BY = 0.95  # bfloat16 only where its median forward and backward is below this fraction of float32's
# Steps of fewer FLOPs than this stay float32 untimed: at nanoGPT's CPU shape (4e9) bfloat16 made
# the step 2% faster, and a timing of a few milliseconds would choose by the machine's noise.
BF16_UNTIMED_FLOPS = 1e10
# Products smaller than this stay with MKL untimed: at a few microseconds a call, the fixed
# cost of a call decides, not the library, and a timing would choose by the machine's noise.
UNTIMED_FLOPS = 1.6e7


def onednn_available() -> bool:
    """oneDNN's matrix multiply is in this build of PyTorch, on an x86 CPU (its ARM build differs)."""
    import platform
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# ----------------------------------------------------------------------------- the products
def product(library, a, b):
    """a @ b.T for 2-D float32 tensors (transposed views included), by library."""
    if library == "mkl":
        return a @ b.t()
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def weight_grad(library, grad_rows, rows):
    """grad^T x, the weight's gradient. oneDNN copies a transposed first operand into rows (its
    second it reads as it lies), so the narrower of the two goes first."""
    if library == "mkl" or grad_rows.size(1) <= rows.size(1):
        return product(library, grad_rows.t(), rows.t())
    return product(library, rows.t(), grad_rows.t()).t().contiguous()


class ChosenLinearFunction(torch.autograd.Function):
    """y = x W^T + b and its backward, each of the three products by the library chosen for it."""

    @staticmethod
    def forward(ctx, x, weight, bias, libraries):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.libraries = bias is not None, libraries
        rows = x.reshape(-1, x.size(-1))
        out = product(libraries[0], rows, weight)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        rows, grad_rows = x.reshape(-1, x.size(-1)), grad.reshape(-1, grad.size(-1))
        grad_x = product(ctx.libraries[1], grad_rows, weight.t()).view(x.shape)  # grad @ W
        grad_weight = weight_grad(ctx.libraries[2], grad_rows, rows)
        return grad_x, grad_weight, grad_rows.sum(0) if ctx.has_bias else None, None


class ChosenLinear(nn.Linear):
    """nn.Linear whose products, where gradients are taken in float32 on the CPU, go through
    the libraries chosen for its shape. Elsewhere (evaluation and sampling, where oneDNN's
    larger fixed cost per call counts most; autocast; torch.compile, which fuses its own) it
    is nn.Linear. use_matmuls turns a model's nn.Linear layers into this class in place, so
    the state dict and the optimizer's parameters are unchanged."""

    libraries = ("mkl",) * 3

    def forward(self, x):
        if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return ChosenLinearFunction.apply(x, self.weight, self.bias, self.libraries)
        return super().forward(x)


# ----------------------------------------------------------------------------- the choice
def shape_of(layer):
    return f"{layer.in_features}x{layer.out_features}"


def linear_layers(model):
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def seconds_of(call):
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def medians_in_turn(calls):
    """{name: median seconds} of each of calls ({name: call()}), timed TIMINGS times in turn
    after a round that is not timed, so that a change in the machine's speed falls on all alike."""
    times = {name: [] for name in calls}
    for timed in range(TIMINGS + 1):
        for name, call in calls.items():
            seconds = seconds_of(call)
            if timed:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


def time_products(in_features, out_features, rows):
    """{product: {library: median seconds}} for one shape's three products at rows rows."""
    rows = max(16, min(rows, int(TIMED_FLOPS / (2 * in_features * out_features))))
    x, weight, grad = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(rows, out_features)
    calls = {"output": lambda library: product(library, x, weight),
             "input_grad": lambda library: product(library, grad, weight.t()),
             "weight_grad": lambda library: weight_grad(library, grad, x)}
    return {name: medians_in_turn({library: functools.partial(call, library) for library in LIBRARIES})
            for name, call in calls.items()}


def choose_matmuls(model, rows):
    """"mkl", or {shape "INxOUT": (library per product)} with oneDNN where it was clearly faster.
    rows: the rows a layer multiplies per call (batch x block)."""
    if not onednn_available():
        return "mkl"
    choice = {}
    with torch.no_grad():
        for layer in linear_layers(model):
            shape = shape_of(layer)
            if shape in choice:
                continue
            if 2 * rows * layer.in_features * layer.out_features < UNTIMED_FLOPS:
                continue
            medians = time_products(layer.in_features, layer.out_features, rows)
            choice[shape] = tuple("onednn" if medians[name]["onednn"] < FASTER_BY * medians[name]["mkl"] else "mkl"
                                  for name in PRODUCTS)
    return "mkl" if all(libraries == ("mkl",) * 3 for libraries in choice.values()) else choice


def use_matmuls(model, choice):
    """Each nn.Linear of model multiplies as choice says ("mkl", "onednn", or per shape)."""
    if choice == "mkl":
        return
    for layer in linear_layers(model):
        libraries = (choice,) * 3 if isinstance(choice, str) else choice.get(shape_of(layer), ("mkl",) * 3)
        if libraries != ("mkl",) * 3:
            layer.__class__ = ChosenLinear
            layer.libraries = tuple(libraries)


def matmul_problem(value):
    """flags' check of the matmul key; a choice per shape is what a run fits itself."""
    if value not in ("auto", *LIBRARIES) and not isinstance(value, dict):
        return f"one of auto, mkl, onednn, got {value!r}"
    if value == "onednn" and not onednn_available():
        return "this PyTorch build has no oneDNN matrix multiply (it has one on x86 only): use auto or mkl"
    return None


# ----------------------------------------------------------------------------- bfloat16
def choose_dtype(model, batch_size, block_size):
    """("bfloat16" or "float32", bfloat16's time over float32's, None when untimed): the model's
    forward and backward on a quarter of the batch, each way in turn, medians. A first call of
    each on one row tells a CPU that emulates bfloat16 (10x slower) without timing more, so the
    choice takes well under a second either way. Leaves no gradient and the random numbers as
    they were."""
    if model.flops_per_token() * batch_size * block_size < BF16_UNTIMED_FLOPS:
        return "float32", None
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(model.config.vocab_size, (max(1, batch_size // 4), block_size + 1), generator=generator)

    def forward_backward(dtype, rows=len(tokens)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            _, loss = model(tokens[:rows, :-1], tokens[:rows, 1:])
        loss.backward()
    with torch.random.fork_rng(devices=[]):  # dropout's draws here leave the run's own as they were
        seconds = {dtype: seconds_of(lambda: forward_backward(dtype, 1)) for dtype in ("float32", "bfloat16")}
        if seconds["bfloat16"] < 2 * seconds["float32"]:  # else emulated: the probe's figures say enough
            seconds = medians_in_turn({dtype: functools.partial(forward_backward, dtype) for dtype in seconds})
    model.zero_grad(set_to_none=True)
    ratio = seconds["bfloat16"] / seconds["float32"]
    return "bfloat16" if ratio < BF16_FASTER_BY else "float32", ratio


# ----------------------------------------------------------------------------- in a run
def timed_on_rank_0(choose, runtime):
    """choose() on rank 0, which tells the other processes, so that all compute alike."""
    choice = [choose() if runtime.is_main else None]
    if runtime.world_size > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]


class ByteDropout(nn.Dropout):
    """nn.Dropout at rate p rounded to 1/256, its mask drawn 8 bytes at a time (the module
    docstring); the same module otherwise, so set_dropout and state dicts see no difference."""

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        cut = round(self.p * 256)  # an element is dropped where its random byte is below this
        # random_'s default range for int64 leaves the top bit 0: from -2**63 all 64 bits are random
        draws = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device).random_(-2**63, None)
        keep = draws.view(torch.uint8)[: x.numel()].view(x.shape) >= cut
        return (x * keep).mul_(256 / (256 - cut))


def use_byte_dropout(model):
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = ByteDropout


def speed_up(model, cfg, runtime, fitted):
    """On a CPU, before the model is wrapped: with dtype=auto, bfloat16 autocast where its step timed
    faster (choose_dtype); in float32, with matmul=auto, the library per product
    (choose_matmuls); each timed on rank 0; and ByteDropout. fitted: None for a new run, or the
    keys a resumed run's checkpoint fitted (chosen by timing then, kept now; one without dtype,
    from before the choice existed, computed in float32); with eval_only, the evaluated
    checkpoint's. Sets the runtime's dtype, applies the libraries. Returns ({key: value} chosen
    now, which the run fits so that a resumed run computes as this one does; what the plan line
    says of it). Elsewhere ({}, ""): GPUs have their own kernels, and torch.compile chooses its
    own."""
    if runtime.device.type != "cpu" or cfg.compile:
        return {}, ""
    if cfg.eval_only:  # as the checkpoint's run trained (else float32), untimed: no gradients, no library to choose
        set_dtype(runtime, fitted.get("dtype", "float32") if cfg.dtype == "auto" else cfg.dtype)
        return {}, ""
    use_byte_dropout(model)
    chosen, said = {}, []
    if cfg.dtype == "auto" and fitted is None:
        chosen["dtype"], ratio = timed_on_rank_0(lambda: choose_dtype(model, cfg.batch_size, cfg.block_size), runtime)
        if ratio is not None:
            said.append(f"bfloat16 autocast: its step timed {ratio:.2f}x float32's at this run's shapes"
                        if chosen["dtype"] == "bfloat16" else f"float32: bfloat16 autocast timed {ratio:.2f}x its time")
    set_dtype(runtime, chosen.get("dtype", cfg.dtype))
    if runtime.dtype != torch.float32:  # autocast's own kernels
        return chosen, "; ".join(said)
    choice = cfg.matmul
    if choice == "auto":
        choice = chosen["matmul"] = timed_on_rank_0(lambda: choose_matmuls(model, cfg.batch_size * cfg.block_size),
                                                    runtime)
    use_matmuls(model, choice)
    return chosen, "; ".join([*said, plan_line(choice, "matmul" in chosen or "matmul" in (fitted or {}))])


def plan_line(choice, measured):
    """What the plan says of the library that multiplies, and why."""
    if isinstance(choice, str):
        why = "oneDNN was not faster at this run's shapes" if measured else f"matmul={choice}"
        text = f"matrix multiplies by {'MKL' if choice == 'mkl' else 'oneDNN'} ({why})"
    else:
        text = ("matrix multiplies by oneDNN (D) where it timed faster than MKL (M) at this run's shapes, "
                "per layer shape (output/input grad/weight grad): " + ", ".join(
                    f"{shape} {'/'.join('D' if library == 'onednn' else 'M' for library in libraries)}"
                    for shape, libraries in choice.items()))
    return text
