"""How several processes share one model: DDP copies it whole into each, FSDP shards it.

    train_model, model = wrap_model(raw_model, "fsdp", runtime)  # each block, then the whole model, sharded
    grad_norm = clip_gradients(params, max_norm)                 # a plain tensor under either
    with gathered(model): ...                                    # whole weights on every rank, to evaluate
    model_state, optimizer_state = states_to_save(model, optimizer, whole=True)  # every rank; rank 0 saves

DDP (DistributedDataParallel) keeps the whole model, its gradients and the optimizer's state
in every process, about 16 bytes per parameter with AdamW before activations, and averages
the gradients in backward. FSDP2 (torch.distributed.fsdp.fully_shard, as torchtitan uses it)
keeps 1/world_size of each in each process: a block's weights are all-gathered just before
its forward and backward and freed after, and its gradients are reduce-scattered, so each
process holds and steps only its rows of every matrix (dim 0, the last rank's share padded).
A parameter is then a DTensor: its local rows plus the mesh and placement that say where the
others are; full_tensor() gathers the whole (a collective: every rank must call it, in the
same order).

The checkpoint stays one format: full_state gathers every DTensor of a state dict into a
whole CPU tensor, so the model and optimizer states rank 0 writes are those of one process
(sample.py, export.py and resume read them as ever), and shard_optimizer_state cuts a
loaded whole state back into this rank's rows.
"""
import contextlib
import sys
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel

PARALLELISMS = ("ddp", "fsdp")


# torch.distributed.fsdp and torch.distributed.tensor are imported by wrap_model only: at
# import they cost a process ~0.6 s (sympy, DTensor's operator tables), which every train.py,
# sample.py and export.py would pay. Until a run has imported them, nothing can be theirs.
def is_dtensor(value):
    """Whether value is a DTensor: a tensor of which this rank holds some rows (FSDP)."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(value, tensor.DTensor)


def distribute_like(whole, like):
    """whole (the same on every rank), cut to this rank's rows of the DTensor like. No communication."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def wrap_model(model, parallelism, runtime, compile=False):
    """The model training runs: itself in one process, DDP's replica or FSDP's shards under torchrun.

    FSDP shards each block on its own, so that only one block's weights are whole at a time,
    then the root (embeddings, head, final norm) as one more unit; the mesh is explicit, or
    a CPU (gloo) job would be placed on CUDA (pytorch issue 132471). On GPUs the weights are
    gathered in the run's dtype (bfloat16) and the gradients reduced in float32, which
    replaces autocast's casts of the matmuls (the loss stays under autocast, in float32)."""
    if parallelism == "ddp" or runtime.world_size == 1:  # one process: nothing to share
        model = model.to(runtime.device)
        compiled = torch.compile(model) if compile else model
        return (DistributedDataParallel(compiled) if runtime.world_size > 1 else compiled), compiled
    # GPT.forward returns the logits as a view (the padded vocabulary cut off); nothing here
    # changes them in place, which is what FSDP warns about at every run
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=runtime.dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.compile()  # each block before sharding, as torchtitan does
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # backward needs it at once
    return model, model


def clip_gradients(params, max_norm):
    """Clip the gradients' global norm to max_norm; return the norm before clipping, a plain
    tensor (FSDP's is a DTensor, each rank holding its rows' share: full_tensor reduces it)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if is_dtensor(norm) else norm


@contextlib.contextmanager
def gathered(model):
    """Whole weights on every rank while inside, for evaluation and sampling: these may run a
    different number of forwards on each rank (or on rank 0 alone), which FSDP's per-forward
    all-gathers cannot. Outside FSDP it does nothing."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    units = [module for module in model.modules() if fsdp and isinstance(module, fsdp.FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        if units:  # reshard, and forget these forwards, from which backward would plan its prefetches
            model.reset_iter_state()
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as wrap_model set them


def full_state(state):
    """state (a state dict, nested) with every DTensor gathered into a whole CPU tensor: a
    collective, so every rank calls it. It is state itself when it holds no DTensor."""
    if isinstance(state, (dict, list)):
        keys = state.keys() if isinstance(state, dict) else range(len(state))
        items = {key: full_state(state[key]) for key in keys}
        if all(items[key] is state[key] for key in keys):
            return state
        return items if isinstance(state, dict) else list(items.values())
    return state.full_tensor().cpu() if is_dtensor(state) else state


def full_model_state(model):
    """model.state_dict() with whole tensors (full_state); a tied weight (the gpt2 block's
    head) stays one tensor under its two names, as in one process's state dict."""
    state = full_state(model.state_dict())
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        state[name] = state[first_name.setdefault(id(param), name)]
    return state


def states_to_save(model, optimizer, whole):
    """(model state, optimizer state) for a checkpoint: whole tensors (full_state, a collective),
    or with whole=False each rank's rows as they are, for a sharded checkpoint."""
    if not whole:
        return model.state_dict(), optimizer.state_dict()
    return full_model_state(model), full_state(optimizer.state_dict())


def shard_optimizer_state(optimizer):
    """After optimizer.load_state_dict(whole state): cut each state tensor shaped like its
    sharded parameter to this rank's rows, as the optimizer's own steps would have made it.
    No communication: every rank loaded the whole. Outside FSDP it does nothing."""
    for part in getattr(optimizer, "parts", {"": optimizer}).values():  # MuonAndAdamW's, or the optimizer
        for param, values in part.state.items():
            if is_dtensor(param):
                for key, value in values.items():
                    if torch.is_tensor(value) and not is_dtensor(value) and value.shape == param.shape:
                        values[key] = distribute_like(value, param)
