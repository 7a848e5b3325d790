"""What makes a training step faster on a CPU, measured on the CPU that runs it.

    choice = choose_matmuls(model, rows=batch_size * block_size)  # "mkl", or per layer shape what won
    use_matmuls(model, choice)              # each linear layer multiplies through the library chosen

train.py applies them on a CPU and says in its plan line what it chose; model.py knows none of
it (its layers are nn.Linear). `--matmul=mkl` or `--matmul=onednn` forces one library.

The matrix multiplies. PyTorch multiplies float32 matrices on a CPU with MKL. oneDNN, also
inside PyTorch (torch.ops.mkldnn._linear_pointwise, which torch.compile's CPU backend uses
for inference), runs the same products twice as fast on an AMD Zen 5 core (MKL keeps its
widest kernels for Intel processors), a little faster on Zen 4, and slower for some products on
CPUs with AVX2 only (RESULTS.md: the CPU's matrix multiplies). So no CPU name decides: each
linear layer shape's three products (its output, its input's gradient, its weight's gradient)
are timed with both libraries at the run's own row count, in turn, and oneDNN takes a
product only where it was clearly faster; a tie stays with MKL, PyTorch's own path. The
choice is kept in the run's config (a fitted key), so a resumed run multiplies as it did.

What else was measured and left out (RESULTS.md: The quick start on both kinds of CPU): the
loss computed a cache-sized piece of the logits at a time, the softmax's gradient made in
place of the logits and the head's product without its padding rows were no faster in the
whole step. torch.compile (train.py --compile) makes each step faster, but its first compile
takes a share of a 4.5-minute run and it needs a C++ compiler: not a default yet.
"""
import statistics
import time

import torch
import torch.nn as nn

LIBRARIES = ("mkl", "onednn")
PRODUCTS = ("output", "input_grad", "weight_grad")
FASTER_BY = 0.95  # oneDNN takes a product only where its median time is below this fraction of MKL's
TIMED_FLOPS = 1.5e8  # each timed product is cut to about this many FLOPs (fewer rows), to choose well under a second
TIMINGS = 5  # timed calls of each product with each library, after one that is not timed
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


def time_products(in_features, out_features, rows):
    """{product: {library: median seconds}} for one shape's three products at rows rows."""
    rows = max(16, min(rows, int(TIMED_FLOPS / (2 * in_features * out_features))))
    x, weight, grad = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(rows, out_features)
    calls = {"output": lambda library: product(library, x, weight),
             "input_grad": lambda library: product(library, grad, weight.t()),
             "weight_grad": lambda library: weight_grad(library, grad, x)}
    medians = {}
    for name, call in calls.items():
        times = {library: [] for library in LIBRARIES}
        for timed in range(TIMINGS + 1):  # in turn, so a change in the machine's speed falls on both
            for library in LIBRARIES:
                seconds = seconds_of(lambda: call(library))
                if timed:
                    times[library].append(seconds)
        medians[name] = {library: statistics.median(values) for library, values in times.items()}
    return medians


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


# ----------------------------------------------------------------------------- in a run
def speed_up(model, cfg, runtime):
    """On a CPU in float32, before the model is wrapped: choose the libraries (matmul=auto times
    them on rank 0, which tells the other processes, so that all multiply alike) and apply them.
    Returns the choice; elsewhere "mkl": GPUs and autocast have their own kernels, and
    torch.compile chooses its own."""
    if runtime.device.type != "cpu" or runtime.dtype != torch.float32 or cfg.compile:
        return "mkl"
    choice = cfg.matmul
    if choice == "auto":
        choice = [choose_matmuls(model, cfg.batch_size * cfg.block_size) if runtime.is_main else None]
        if runtime.world_size > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        choice = choice[0]
    use_matmuls(model, choice)
    return choice


def plan_line(choice, measured):
    """What the plan says of the CPU's paths, and why."""
    if isinstance(choice, str):
        why = "oneDNN was not faster at this run's shapes" if measured else f"matmul={choice}"
        text = f"matrix multiplies by {'MKL' if choice == 'mkl' else 'oneDNN'} ({why})"
    else:
        text = ("matrix multiplies by oneDNN (D) where it timed faster than MKL (M) at this run's shapes, "
                "per layer shape (output/input grad/weight grad): " + ", ".join(
                    f"{shape} {'/'.join('D' if library == 'onednn' else 'M' for library in libraries)}"
                    for shape, libraries in choice.items()))
    return text
