"""The GPT: a decoder-only transformer in one file, with generation through a KV cache.

Two blocks, chosen by GPTConfig.block, each a class of its own:
- "gpt2" (GPT2Block), GPT-2's architecture (2019): token and learned position embeddings, a
  stack of pre-norm blocks (causal self-attention, then a GELU MLP) with LayerNorm, a final
  LayerNorm, and an output head that shares its weights with the token embedding.
- "modern" (ModernBlock, the default), the changes modded-nanogpt and nanochat found to train more per token (each
  with its source below): rotary position embeddings instead of learned ones, RMSNorm
  without gains (also right after the embedding), RMSNorm on queries and keys, a ReLU^2
  MLP, output projections and head initialised to zero, and a head of its own.
  With value_embeddings, each of its layers also adds a learned vector of the current
  token to the attention values (modded-nanogpt's value embeddings).
train.py and sample.py import it.

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
    bias: bool = False  # biases in Linear and LayerNorm (GPT-2 had them; without is a bit faster); gpt2 block only
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/4 more compute
    block: str = "modern"  # modern | gpt2 (see the module docstring); the defaults are train.py's
    value_embeddings: bool = False  # modern block: each layer adds its own table's vector of the token to the values

    def __post_init__(self):
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {self.block!r}")
        if self.block == "modern" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the modern block's rotary embedding needs an even head size, "
                             f"got n_embd / n_head = {self.n_embd // self.n_head}")
        if self.value_embeddings and self.block != "modern":
            raise ValueError("value_embeddings are part of the modern block: set block='modern'")


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


def rms_norm(x):
    """RMSNorm without a gain (Zhang & Sennrich 2019; gain-free as in modded-nanogpt and
    nanochat): x / sqrt(mean(x^2) + eps) over the last dimension."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer): each pair of a head's channels
    (i, i + head_size/2) is rotated by position * base^(-2i/head_size). The dot product of
    a rotated query and key then depends only on how far apart they are, so the model needs
    no position table and a KV cache can be refilled from any offset."""

    def __init__(self, head_size, max_positions, base=10000.0):
        super().__init__()
        frequencies = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), frequencies)
        # buffers, not parameters, and not saved: they are rebuilt from the config
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start):
        """x: (B, n_head, T, head_size) at positions start .. start + T - 1."""
        T = x.size(2)
        cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """GPT-2's multi-head causal self-attention: each token's query is compared with the keys
    of the tokens up to it, and their values are averaged by those weights. Positions are
    already in its input (learned position embeddings)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = config.n_head
        # one matrix for query, key and value: one large multiply instead of three small ones
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def queries_and_keys(self, q, k, start):
        """q, k (B, n_head, T, head_size) at positions start .. start + T - 1, as attention compares them."""
        return q, k

    def forward(self, x, kv_cache=None, layer=0, value_embedding=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if value_embedding is not None:
            v = v + value_embedding
        # (B, T, C) -> (B, n_head, T, head_size): each head attends on its own
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = self.queries_and_keys(q, k, kv_cache.length if kv_cache is not None else 0)
        if kv_cache is not None:
            # A prefill starts from an empty cache, so queries and keys line up and the
            # usual causal mask applies; a single new query may look at every stored key.
            assert kv_cache.length == 0 or T == 1, "the cache takes a prefill, then one token at a time"
            k, v = kv_cache.store(layer, k, v)
        # dropout acts on the residual stream only, not on the attention weights: with it, a
        # CPU's scaled_dot_product_attention leaves its fused kernel and the attention costs
        # 2.3x as much, for no gain at equal time (RESULTS.md: Own small text)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=(T > 1))
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class RotaryAttention(CausalSelfAttention):
    """The modern block's attention: the same, with normalised queries and keys that carry
    their positions as rotations (its input has no positions)."""

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)

    def queries_and_keys(self, q, k, start):
        # QK-norm (Dehghani et al. 2023; modded-nanogpt): unit-RMS queries and keys keep the
        # attention logits bounded, which lets the learning rate be higher
        return self.rotary(rms_norm(q), start), self.rotary(rms_norm(k), start)


class MLP(nn.Module):
    """GPT-2's MLP: widen to 4 x n_embd, GELU, project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def activation(self, x):
        # The exact GELU, x * Phi(x) (Hendrycks & Gimpel 2016). GPT-2 used its tanh
        # approximation, which is within 5e-4 of it everywhere but slower on a CPU
        # (RESULTS.md: exact GELU).
        return F.gelu(x)

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class ReLU2MLP(MLP):
    """The modern block's MLP: ReLU^2 (So et al. 2021, Primer), cheaper than GELU and
    trained better in their search and in modded-nanogpt."""

    def activation(self, x):
        return F.relu(x).square()


class GPT2Block(nn.Module):
    """GPT-2's block, pre-norm: each sublayer reads a LayerNorm'd copy of the residual stream
    and adds its result back, so the stream itself is a clean sum that gradients pass through
    unchanged."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0, value_embedding=None):
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class ModernBlock(nn.Module):
    """The modern block, pre-norm like GPT-2's but with gain-free RMSNorms (no parameters),
    rotary attention with QK-norm, and a ReLU^2 MLP; its attention values may get the
    layer's value embedding of each token."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn = RotaryAttention(config)
        self.mlp = ReLU2MLP(config)

    def forward(self, x, kv_cache=None, layer=0, value_embedding=None):
        x = x + self.attn(rms_norm(x), kv_cache, layer, value_embedding)
        return x + self.mlp(rms_norm(x))


BLOCKS = {"gpt2": GPT2Block, "modern": ModernBlock}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.modern = config.block == "modern"
        # the modern block has rotary positions (no wpe) and gain-free norms (no ln_f)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab_size(config.vocab_size), config.n_embd),
            **({} if self.modern else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(BLOCKS[config.block](config) for _ in range(config.n_layer)),
            **({} if self.modern else dict(ln_f=nn.LayerNorm(config.n_embd, bias=config.bias))),
        ))
        # Value embeddings (modded-nanogpt's speedrun records): a table per layer whose row for
        # the current token is added to that layer's attention values, so every layer reads the
        # token's identity directly, not only through the residual stream. n_layer more
        # vocab x n_embd tables, looked up, not multiplied (RESULTS.md: value embeddings).
        # Without them the list is empty and adds no keys to the state dict, so older
        # checkpoints load as they were.
        self.value_embeds = nn.ModuleList(nn.Embedding(padded_vocab_size(config.vocab_size), config.n_embd)
                                          for _ in range(config.n_layer if config.value_embeddings else 0))
        self.lm_head = nn.Linear(config.n_embd, padded_vocab_size(config.vocab_size), bias=False)
        if not self.modern:
            # Weight tying (Press & Wolf 2017): reading a token and predicting it use one
            # matrix, which saves vocab_size * n_embd parameters and trains at least as well.
            # The modern recipe unties them (modded-nanogpt, nanochat): the head then learns
            # at its own rate.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights_modern if self.modern else self._init_weights)

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

    def _init_weights_modern(self, module):
        """The modern block's initialisation (modded-nanogpt, nanochat): matrices uniform
        with std 1/sqrt(fan_in), so each output starts at unit scale whatever the width; the
        projections into the residual stream and the head start at zero, so each block
        starts as the identity and the first logits are uniform; the embedding N(0, 1)
        (an RMSNorm follows it); the value embeddings at zero, adding nothing at first."""
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False) or module is self.lm_head:
                nn.init.zeros_(module.weight)
            else:
                bound = math.sqrt(3 / module.in_features)  # uniform(-b, b) has std b / sqrt(3)
                nn.init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif module is self.transformer.wte:
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
            with torch.no_grad():
                module.weight[self.config.vocab_size:].zero_()  # the padding rows
        elif isinstance(module, nn.Embedding):  # a value embedding
            nn.init.zeros_(module.weight)

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
        if self.modern:
            x = self.transformer.drop(rms_norm(self.transformer.wte(idx)))  # positions: rotary, in attention
        else:
            positions = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
            x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer, block in enumerate(self.transformer.h):
            value_embedding = self.value_embeds[layer](idx) if self.value_embeds else None
            if recompute:
                # keep only each block's input; its insides are recomputed in backward
                # (the RNG state is replayed, so dropout masks are the same both times)
                x = checkpoint(block, x, None, layer, value_embedding, use_reentrant=False)
            else:
                x = block(x, kv_cache, layer, value_embedding)
        if kv_cache is not None:
            kv_cache.length += T
        return rms_norm(x) if self.modern else self.transformer.ln_f(x)

    def head(self, x):
        """Logits over the real vocabulary: the padded columns are cut off."""
        return self.lm_head(x)[..., : self.config.vocab_size]

    def set_dropout(self, p: float):
        """Every dropout layer's rate: train.py sets it from the data once it knows how many
        times the run reads it (owngpt/epochs.py)."""
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p

    def num_params(self) -> int:
        """All parameters, a tied head counted once, the padding rows of the vocabulary's tables not."""
        padding = (padded_vocab_size(self.config.vocab_size) - self.config.vocab_size) * self.config.n_embd
        tables = 1 if self.lm_head.weight is self.transformer.wte.weight else 2 + len(self.value_tables())
        return sum(p.numel() for p in self.parameters()) - tables * padding

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N + 12 * n_layer * n_embd * block_size.

        PaLM (Chowdhery et al. 2022), appendix B: every weight does a multiply-add
        (2 FLOPs) forward and twice that backward (6N), plus the attention scores and their
        weighted sum over a context of T (12 L C T). N counts the weights that multiply: the
        matrices, the head with the padding rows it computes, not the lookups of the token,
        value and position embeddings, nor the norms' gains and the biases, which add.
        """
        c = self.config
        lookups = [self.transformer.wte.weight, *self.value_tables()] if self.modern else [self.transformer.wpe.weight]
        multiplied = sum(p.numel() for p in self.parameters() if p.dim() == 2 and not any(p is t for t in lookups))
        return 6 * multiplied + 12 * c.n_layer * c.n_embd * c.block_size

    def value_tables(self):
        """The value embeddings' weights: one per layer, or none."""
        return [table.weight for table in self.value_embeds]

    def parameter_groups(self, hidden_matrices_apart):
        """The parameters by how they are optimised: (hidden, matrices, vectors). hidden are
        the blocks' weight matrices (a list, empty unless hidden_matrices_apart), for Muon;
        matrices the other tensors of dim >= 2 (embeddings, head), which weight decay pulls
        on; vectors the gains and biases, whose size carries no overfitting risk."""
        params = [p for p in self.parameters() if p.requires_grad]
        hidden_ids = {id(p) for p in self.transformer.h.parameters() if p.dim() == 2} if hidden_matrices_apart else set()
        hidden = [p for p in params if id(p) in hidden_ids]
        matrices = [p for p in params if p.dim() >= 2 and id(p) not in hidden_ids]
        vectors = [p for p in params if p.dim() < 2]
        return hidden, matrices, vectors

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, stop_token=None, use_cache=True) -> Iterator[torch.Tensor]:
        """Yield the next token of every row of idx (B, T), shape (B,), one step at a time.

        temperature 0 is greedy; top_k keeps the k likeliest tokens, top_p the smallest set
        whose probability reaches p; generator (a torch.Generator) makes sampling
        repeatable. With stop_token, a row that produced it keeps yielding it, and
        generation ends once every row has. Put the model in eval() mode first.

        With use_cache the prompt is read once and each step reads just the new token.
        The cache holds block_size tokens, so it cannot grow forever. Once the context outgrows block_size, generation turns the page like a reader: it
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


if __name__ == "__main__":
    torch.manual_seed(0)
    demo = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=64)).eval()
    print(f"{demo.num_params():,} parameters, {demo.flops_per_token():,.0f} training FLOPs per token")
    prompt = torch.zeros(1, 1, dtype=torch.long)
    print("untrained, so random:", [int(t) for t in demo.generate(prompt, max_new_tokens=10)])
