"""The optimizers: AdamW for every parameter, or Muon for the hidden matrices and AdamW for the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon; used by modded-nanogpt's speed records and nanochat)
takes SGD's momentum and replaces each matrix's update by the nearest semi-orthogonal
matrix: the same directions, every singular value set to about 1. Rare directions of the
gradient then move as fast as the dominant ones. It suits the 2-D matrices inside the
network; embeddings, the output head, gains and biases keep AdamW (the post above, nanochat).

    optimizer = build_optimizer(model, "muon", learning_rate=1.2e-2, muon_lr=0.02, weight_decay=0.1,
                                betas=(0.8, 0.99), device_type="cpu", embedding_lr=0.3)
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

Each parameter group names the config key of its peak rate in group["lr_key"]
(learning_rate, muon_lr or embedding_lr), so that the schedule (set_learning_rates, each
iteration), and a resumed run given another rate, can set every group's rate from the config.
"""
import math

import torch

from owngpt.parallel import distribute_like, is_dtensor

OPTIMIZERS = ("adamw", "muon")

# The quintic Newton-Schulz iteration's coefficients from the Muon post: they push every
# singular value of a normalised matrix into about [0.7, 1.2] in 5 steps, faster than the
# textbook cubic iteration converges, and the update needs no more.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalise(update, steps=NS_STEPS):
    """The semi-orthogonal matrix nearest update: about U V^T of its SVD U S V^T."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16() if update.is_cuda else update.float()  # bf16 is stable here (the post) and fast on GPUs
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        # x <- a x + (b gram + c gram^2) x, each multiply-add one addmm: fewer passes over memory
        # than the same sum in separate products and additions (RESULTS.md: fused Newton-Schulz)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


def orthogonalise_rows(update, steps=5):
    """orthogonalise, also for a DTensor of which this rank holds some rows (FSDP): the
    whole matrix is gathered, orthogonalised on every rank alike and cut back to the local
    rows. Exact (the same numbers as one process), at world_size times the Newton-Schulz work
    and one all-gather per matrix; a rank that owned whole matrices (Dion's all-to-all) would
    share that work."""
    if not is_dtensor(update):
        return orthogonalise(update, steps)
    return distribute_like(orthogonalise(update.full_tensor(), steps), update)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalise, then scale by sqrt(max(1, rows / cols)) so that a
    tall matrix's update has the per-element size of a wide one's (the Muon post); weight
    decay decoupled as in AdamW (Liu et al. 2025, "Muon is scalable for LLM training")."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0, ns_steps=NS_STEPS):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.mul_(group["momentum"]).add_(param.grad)
                update = orthogonalise_rows(param.grad.add(buffer, alpha=group["momentum"]), group["ns_steps"])
                scale = max(1.0, param.size(0) / param.size(1)) ** 0.5
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"] * scale)


class MuonAndAdamW:
    """Muon for some parameters and torch's AdamW for the others, used as one optimizer:
    one step, one zero_grad, one state_dict; param_groups lists every group, so the
    schedule and torch's GradScaler (which reads only param_groups and step) see them all."""

    def __init__(self, muon, adamw):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self):  # read anew: load_state_dict replaces the parts' group dicts
        return [group for part in self.parts.values() for group in part.param_groups]

    def step(self):
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none=True):
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def build_optimizer(model, kind, learning_rate, muon_lr, weight_decay, betas, device_type, embedding_lr=None):
    """AdamW at learning_rate for everything, or (kind "muon") Muon at muon_lr for the
    blocks' matrices and AdamW at learning_rate for the rest. AdamW decays the matrices.
    With embedding_lr, an untied token embedding (the modern block's) gets AdamW at that
    rate and no decay (a norm follows it, so its scale is free): it starts at unit scale,
    where learning_rate's steps would barely move it. nanochat gives it 0.2 at width 768
    and modded-nanogpt 0.6; 0.3 measured best here (RESULTS.md: embedding_lr). The value
    embeddings, tables like it, go with it."""
    hidden, matrices, vectors = model.parameter_groups(hidden_matrices_apart=kind == "muon")
    embedding = model.transformer.wte.weight
    untied = embedding_lr is not None and embedding is not model.lm_head.weight
    tables = [embedding, *model.value_tables()] if untied else []
    matrices = [p for p in matrices if not any(p is table for table in tables)]
    groups = [{"params": matrices, "weight_decay": weight_decay, "lr_key": "learning_rate"},
              {"params": vectors, "weight_decay": 0.0, "lr_key": "learning_rate"}]
    if tables:
        groups.append({"params": tables, "weight_decay": 0.0, "lr": embedding_lr, "lr_key": "embedding_lr"})
    # The fused kernel updates all tensors in one pass instead of one small op at a time: on
    # CUDA that is one launch, and on CPU it is faster too (RESULTS.md: fused AdamW on CPU).
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))
    if kind == "adamw":
        return adamw
    muon = Muon([{"params": hidden, "lr_key": "muon_lr"}], lr=muon_lr, weight_decay=0.0)
    return MuonAndAdamW(muon, adamw)


def set_weight_decay(optimizer, weight_decay):
    """The decayed groups' weight decay (those built with build_optimizer's weight_decay, the
    only ones above zero), as train.py sets it from the data."""
    for group in optimizer.param_groups:
        if group["weight_decay"]:
            group["weight_decay"] = weight_decay


# ----------------------------------------------------------------------------- the schedule
def set_learning_rates(optimizer, iteration, cfg):
    """Set every group's rate for this iteration: its own peak (its lr_key), scaled as
    learning_rate_at scales learning_rate; and Muon's momentum. Returns AdamW's rate."""
    lr = learning_rate_at(iteration, cfg)
    for group in optimizer.param_groups:
        group["lr"] = getattr(cfg, group.get("lr_key", "learning_rate")) * lr / cfg.learning_rate
        if "momentum" in group:  # Muon's
            group["momentum"] = muon_momentum_at(iteration)
    return lr


def muon_momentum_at(iteration):
    """Muon's momentum: from 0.85 up to its usual 0.95 over the first 300 iterations
    (modded-nanogpt's warmup), while the first gradients still point in changing directions
    (RESULTS.md: Muon momentum warmup)."""
    return 0.95 - 0.10 * max(0.0, 1 - iteration / 300)


def decay_end(cfg):
    """The iteration at which the schedule reaches min_lr: lr_decay_iters, or max_iters when 0.
    A run planned for more iterations and stopped early with max_iters, then continued, is one
    run: its decay ends at lr_decay_iters either way."""
    return cfg.lr_decay_iters or cfg.max_iters


def cooldown_start(cfg):
    """wsd: the iteration at which the peak is left, the last cooldown_fraction before decay_end."""
    return decay_end(cfg) * (1 - cfg.cooldown_fraction)


def patience_ending(cfg, iteration, evals_since_best, best_val_loss):
    """patience: after that many evaluations without a new best val loss, the run ends. Returns
    (the keys to fit, what to say), or None while patience lasts. Under cosine it ends at this
    iteration (its last checkpoint is this evaluation's, best.pt the best). Under wsd the
    cooldown is where the loss falls most: a run out of patience at its peak rate cools down
    first, as a run planned to end then would have (the schedule then ends at iteration /
    (1 - cooldown_fraction)), and one already cooling down finishes."""
    if not cfg.patience or evals_since_best < cfg.patience or iteration >= cfg.max_iters:
        return None
    said = f"patience={cfg.patience}: no new best val loss in {evals_since_best} evaluations"
    if cfg.lr_schedule == "cosine":
        return {"max_iters": iteration}, (f"{said}: stopping at iteration {iteration} "
                                          f"(best.pt holds val loss {best_val_loss:.4f})")
    if iteration < cooldown_start(cfg):
        end = max(iteration, int(iteration / (1 - cfg.cooldown_fraction)))
        return {"lr_decay_iters": 0, "max_iters": end}, (f"{said}: cooling down from iteration {iteration} "
                                                         f"to {end}, then stopping")
    return None


def learning_rate_at(iteration, cfg):
    """AdamW's learning rate at this iteration (from 0); every parameter group's rate is its
    own peak scaled alike. Linear warmup, then either a cosine decay to min_lr at decay_end
    (GPT-3 and Chinchilla's schedule) or, with wsd, the peak held until cooldown_start and a
    linear decay to min_lr at decay_end (warmup-stable-decay: Hu et al. 2024, MiniCPM; as
    modded-nanogpt and nanochat train)."""
    if iteration < cfg.warmup_iters:
        return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)
    end = decay_end(cfg)
    if iteration >= end:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        start = cooldown_start(cfg)
        progress = min(1.0, max(0.0, (iteration - start) / max(1, end - start)))
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    progress = (iteration - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)
