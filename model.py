"""The GPT: a decoder-only transformer in one file, with generation through a KV cache.

It is GPT-2's architecture: token and learned position embeddings, a stack of pre-norm
blocks (causal self-attention, then an MLP), a final LayerNorm, and an output head that
shares its weights with the token embedding. train.py and sample.py import it.

Run on its own, it builds a small model and prints its size and a few generated tokens:

    python model.py

Example:

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64))
    logits, loss = model(idx, targets)          # idx, targets: (B, T) int64
    for token in model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=50):
        ...                                     # token: (B,), one per step, as it is made
"""
import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 256  # the longest context the model sees (learned positions)
    vocab_size: int = 8192  # the tokenizer's vocabulary, end-of-text included
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them; without is a bit faster)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute


def padded_vocab_size(vocab_size: int) -> int:
    """The embedding's row count: vocab_size rounded up to a multiple of 64.

    Matrix multiplies run fastest on GPUs when their sizes are multiples of 64 (GPT-2's
    50257 becomes 50304). The extra rows stay zero: they are cut from the logits, so they
    are never sampled, add nothing to the loss, and never receive a gradient.
    """
    return (vocab_size + 63) // 64 * 64


class KVCache:
    """The keys and values of every layer for the tokens the model has already read.

    Generation feeds the prompt once (prefill), then one token per step: each step's
    attention needs the keys and values of all earlier tokens, and those never change, so
    they are kept here instead of being recomputed. The buffers are allocated once, at
    block_size, on the first write (so they take the dtype the model computes in).
    """

    def __init__(self, config: GPTConfig):
        self.config = config
        self.keys = self.values = None
        self.length = 0  # tokens already stored, i.e. the position of the next token

    def clear(self):
        self.length = 0

    def store(self, layer: int, k, v):
        """Write this layer's k, v (B, n_head, T, head_size) after the stored tokens;
        return all keys and values so far. GPT.forward advances `length` after the last layer."""
        if self.keys is None:
            c = self.config
            shape = (c.n_layer, k.size(0), c.n_head, c.block_size, c.n_embd // c.n_head)
            self.keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values = torch.empty_like(self.keys)
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        self.dropout = config.dropout
        # one matrix for query, key and value: one large multiply instead of three small ones
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            # A prefill starts from an empty cache, so queries and keys line up and the
            # usual causal mask applies; a single new query may look at every stored key.
            assert kv_cache.length == 0 or T == 1, "the cache takes a prefill, then one token at a time"
            k, v = kv_cache.store(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=(T > 1), dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # The exact GELU, x * Phi(x) (Hendrycks & Gimpel 2016). GPT-2 used its tanh
        # approximation, which is within 5e-4 of it everywhere but about 3x slower on CPU.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: each sublayer reads a normalised copy of the residual stream and adds its
    result back, so the stream itself is a clean sum that gradients pass through unchanged."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab_size(config.vocab_size), config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, padded_vocab_size(config.vocab_size), bias=False)
        # Weight tying (Press & Wolf 2017): reading a token and predicting it use one
        # matrix, which saves vocab_size * n_embd parameters and trains at least as well.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """GPT-2's initialisation (its paper, section 2.3, and its released code).

        Weights are N(0, 0.02), position embeddings N(0, 0.01), biases zero. Each block
        adds two outputs to the residual stream (attention and MLP), and the variance of a
        sum grows with the number of terms: the projections that write into the stream are
        scaled by 1/sqrt(2 * n_layer) so the stream's size at init does not grow with depth.
        """
        if module is self.lm_head:
            return  # it is the token embedding, initialised below
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif module is self.transformer.wpe:
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
        elif module is self.transformer.wte:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            with torch.no_grad():
                module.weight[self.config.vocab_size:].zero_()  # the padding rows

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Returns logits (B, T, vocab_size) and the mean
        cross-entropy over the targets that are not -1, or None without targets."""
        logits = self.head(self.hidden_states(idx))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, kv_cache=None):
        """The final normalised hidden states (B, T, n_embd). With a cache, idx are the
        tokens that follow the ones already stored, and they are added to it."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"{start + T} tokens of context, more than block_size={self.config.block_size}")
        positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.transformer.h):
            if recompute:
                # keep only each block's input; its insides are recomputed in backward
                # (the RNG state is replayed, so dropout masks are the same both times)
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        return self.transformer.ln_f(x)

    def head(self, x):
        """Logits over the real vocabulary: the padded columns are cut off."""
        return self.lm_head(x)[..., : self.config.vocab_size]

    def num_params(self) -> int:
        """All parameters, the tied head counted once, the embedding's padding rows not."""
        padding = (padded_vocab_size(self.config.vocab_size) - self.config.vocab_size) * self.config.n_embd
        return sum(p.numel() for p in self.parameters()) - padding

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12 * n_layer * n_embd * block_size.

        PaLM (Chowdhery et al. 2022), appendix B: every weight does a multiply-add
        (2 FLOPs) forward and twice that backward (6N), plus the attention scores and their
        weighted sum over a context of T (12 L C T). N counts the weights that multiply:
        the tied head (the token lookup is free), not the position embeddings.
        """
        c = self.config
        n_matmul = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * c.block_size

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type) -> torch.optim.AdamW:
        """AdamW that decays the matrices (dim >= 2: Linear weights, embeddings) and not
        the gains and biases, whose size carries no overfitting risk worth pulling on."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel updates all tensors in one pass instead of one small op at a time:
        # on CUDA that is one launch; on CPU it took a quarter of the default's time (2 cores).
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, stop_token=None, use_cache=True) -> Iterator[torch.Tensor]:
        """Yield the next token of every row of idx (B, T), shape (B,), one step at a time.

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set
        whose probability reaches p; generator (a torch.Generator) makes sampling
        repeatable. With stop_token, a row that produced it keeps yielding it, and
        generation ends once every row has. Put the model in eval() mode first.

        With use_cache the prompt is read once and each step reads just the new token.
        Positions are learned and absolute, so the cache cannot slide one token at a time.
        Once the context outgrows block_size, generation turns the page like a reader: it
        keeps the last block_size - block_size // 2 tokens, refills the cache from them
        once, and goes on one token per step for the next block_size // 2 steps. The price:
        each token past block_size sees from half a window to a full one of context.
        use_cache=False recomputes the same windows in full at every step: the reference
        the cache is tested against. Both paths sample through the same calls, so they
        agree exactly whenever their logits do.
        """
        check_sampling_options(temperature, top_k, top_p)
        kv_cache = KVCache(self.config) if use_cache else None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        tokens_kept_on_a_new_page = self.config.block_size - self.config.block_size // 2
        window_start = 0  # index in idx of the first token the model sees
        for _ in range(max_new_tokens):
            if idx.size(1) - window_start > self.config.block_size:
                window_start = idx.size(1) - tokens_kept_on_a_new_page
                if kv_cache is not None:
                    kv_cache.clear()
            logits = self._next_token_logits(idx[:, window_start:], kv_cache)
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if stop_token is not None:
                token = torch.where(finished, stop_token, token)
                finished |= token == stop_token
            idx = torch.cat([idx, token[:, None]], dim=1)
            yield token
            if stop_token is not None and bool(finished.all()):
                return

    def _next_token_logits(self, window, kv_cache):
        """Logits (B, vocab_size) for the token after window (B, T <= block_size); with a
        cache, only the tokens of window it does not hold yet are read."""
        new_tokens = window if kv_cache is None else window[:, kv_cache.length:]
        return self.head(self.hidden_states(new_tokens, kv_cache)[:, -1])


def check_sampling_options(temperature, top_k, top_p):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next_token(logits, temperature, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, V): greedy at temperature 0, else a draw from
    the softmax of logits / temperature, restricted to the top_k and then the top_p nucleus."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1:
        # Nucleus sampling (Holtzman et al. 2019): keep the likeliest tokens until their
        # probability reaches top_p. A token is dropped when the ones before it already do;
        # the likeliest is always kept.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# Devices live here, beside peak_flops, because model.py is the one module both train.py and
# sample.py import that already knows torch and nothing of files or flags.
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


def peak_flops(device) -> float | None:
    """Peak dense bf16 tensor FLOP/s of the GPU behind `device` (for MFU), from the vendors'
    datasheets; None for CPU, MPS and any card not in the table: no MFU beats a guessed one."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_of_card(torch.cuda.get_device_name(device))


def peak_flops_of_card(name: str) -> float | None:
    """Look a card's name (as torch.cuda.get_device_name spells it) up in PEAK_BF16_FLOPS."""
    for pattern, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


# (regex searched in torch.cuda.get_device_name, dense bf16 FLOP/s with fp32 accumulation,
# i.e. the datasheets' figures without 2:4 sparsity). Anchored with $ where a longer name
# is another card (A10 / A100, L4 / L40S, RTX 4090 / RTX 4090 D).
PEAK_BF16_FLOPS = [
    (r"A100", 312e12),  # SXM and PCIe alike
    (r"H100 PCIe", 756e12),
    (r"H100( 80GB HBM3| SXM|$)", 989e12),  # SXM; the NVL card is not in the table
    (r"H200$", 989e12),  # SXM
    (r"A10$", 125e12),
    (r"L4$", 121e12),
    (r"RTX 4090$", 165.2e12),  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
    (r"RTX 3090$", 71e12),
]


if __name__ == "__main__":
    torch.manual_seed(0)
    demo = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    print(f"{demo.num_params():,} parameters, {demo.flops_per_token():,.0f} training FLOPs per token")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    print("untrained, so random:", [int(t) for t in demo.generate(prompt, max_new_tokens=10)])
