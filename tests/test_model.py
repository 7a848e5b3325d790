"""The GPT in model.py: what its loss, causality, checkpointing and generation promise,
with GPT-2's block and the modern one."""
import dataclasses
import math

import pytest
import torch

from model import GPT, GPTConfig, padded_vocab_size, sample_next_token
from owngpt import cpu
from owngpt.checkpoint import upgrade
from owngpt.optimizers import build_optimizer
from owngpt.runtime import available_devices, peak_flops, peak_flops_of_card, pick_device


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    settings = dict(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32, block="gpt2")
    return GPTConfig(**{**settings, **overrides})


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def without_zero_weights(model, seed=0):
    """The modern block starts its output projections and head at zero (each block is then
    the identity and the first logits are uniform): give them random weights, as training
    soon does, so that every path through the model shows in its outputs and gradients."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) / p.size(1) ** 0.5)
    return model


# The blocks every promise is checked with: the modern one also with its value embeddings
BLOCKS = {"gpt2": dict(block="gpt2"), "modern": dict(block="modern"),
          "modern_value_embeddings": dict(block="modern", value_embeddings=True)}


def opinionated_model(dtype=torch.float64, block="gpt2", **options):
    """An untrained model with peaked next-token distributions that depend on the whole
    context (larger block weights, a larger final gain or head), so that a mistake in what
    the model sees shows up in its choices."""
    model = without_zero_weights(tiny_model(block=block, **options)).to(dtype).eval()
    with torch.no_grad():
        for p in model.transformer.h.parameters():
            if p.dim() == 2:
                p.mul_(5)
        # the modern block's final norm has no gain: its head sets how peaked the logits are
        (model.lm_head.weight if block == "modern" else model.transformer.ln_f.weight).mul_(30)
    return model


def generate_all(model, prompt, use_cache, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    steps = model.generate(prompt, generator=generator, use_cache=use_cache, **options)
    return torch.stack(list(steps), dim=1)


def test_loss_at_init_is_close_to_ln_vocab_size():
    # small init weights make the first predictions nearly uniform over the vocabulary
    model = tiny_model()
    idx, targets = torch.randint(0, 300, (2, 8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(300)) < 0.05


def test_targets_of_minus_one_are_left_out_of_the_loss():
    model = tiny_model()
    idx, targets = torch.randint(0, 300, (2, 4, 16))
    masked = targets.clone()
    masked[:, 8:] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 300), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("changed_position", [1, 7, 15])
def test_changing_a_future_token_never_changes_earlier_logits(changed_position):
    model = tiny_model().eval()
    idx = torch.randint(0, 300, (3, 16))
    changed = idx.clone()
    changed[:, changed_position] = (idx[:, changed_position] + 1) % 300
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(after[:, :changed_position], before[:, :changed_position], rtol=0, atol=0)
    assert not torch.allclose(after[:, changed_position:], before[:, changed_position:])


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dropout, byte_dropout", [(0.0, False), (0.1, False), (0.1, True)],
                         ids=["no dropout", "nn.Dropout", "ByteDropout"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(dropout, byte_dropout, block):
    """ByteDropout is what train.py uses on a CPU (owngpt/cpu.py): its masks come from random_,
    not bernoulli_, and the recomputation must draw the same ones too."""
    plain = without_zero_weights(tiny_model(seed=1, dropout=dropout, **BLOCKS[block]))
    recomputing = without_zero_weights(tiny_model(seed=1, dropout=dropout, gradient_checkpointing=True, **BLOCKS[block]))
    for model in (plain, recomputing) if byte_dropout else ():
        cpu.use_byte_dropout(model)
    idx, targets = torch.randint(0, 300, (2, 4, 16))
    losses = []
    for model in (plain, recomputing):
        torch.manual_seed(5)  # the same dropout masks for both
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    for (name, p), q in zip(plain.named_parameters(), recomputing.parameters()):
        assert p.grad is not None and p.grad.any(), name  # every parameter is on the path to the loss
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("options", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.9, top_k=20, top_p=0.9),
], ids=["greedy", "seeded_sampling", "seeded_top_k_top_p"])
def test_kv_cache_generation_equals_recomputing_the_whole_context(options, block):
    # float64: the two paths multiply matrices of different shapes, so their logits may
    # differ in the last bits; in float64 that is ~1e-16, far too little to flip a choice.
    # The modern block's rotary positions restart at 0 on each page, in both paths.
    model = opinionated_model(**BLOCKS[block])
    prompt = torch.randint(0, 300, (3, 5))
    # 40 new tokens run well past block_size (16): the page turns four times
    cached = generate_all(model, prompt, use_cache=True, max_new_tokens=40, **options)
    recomputed = generate_all(model, prompt, use_cache=False, max_new_tokens=40, **options)
    assert cached.shape == (3, 40)
    assert torch.equal(cached, recomputed)
    assert len(cached.unique()) > 10  # varied contexts, not one token repeated


def test_past_block_size_the_cache_is_refilled_once_every_half_window():
    model = opinionated_model()
    tokens_read_per_forward = []
    model.transformer.wte.register_forward_hook(
        lambda module, inputs, output: tokens_read_per_forward.append(inputs[0].size(1)))
    prompt = torch.randint(0, 300, (2, 5))
    generate_all(model, prompt, use_cache=True, max_new_tokens=40, temperature=0.0)
    # the prompt (5) is read, the window grows to block_size (16); at 17 tokens the page
    # turns and the last 8 are read again, then 8 single steps fill it up, and so on
    refills = [n for n in tokens_read_per_forward if n > 1]
    assert refills == [5, 8, 8, 8, 8]
    assert len(tokens_read_per_forward) == 40  # the other 35 steps read one token each


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_each_token_past_block_size_sees_the_window_after_the_last_page_turn(block):
    model = opinionated_model(block=block)
    prompt = torch.randint(0, 300, (1, 5))
    generated = generate_all(model, prompt, use_cache=True, max_new_tokens=30, temperature=0.0)
    context = torch.cat([prompt, generated], dim=1)
    window_start = 0
    for step in range(30):
        length = 5 + step  # tokens before this one
        if length - window_start > 16:
            window_start = length - 8
        logits, _ = model(context[:, window_start:length])
        assert int(logits[0, -1].argmax()) == int(generated[0, step]), step


def test_seeded_generation_is_repeatable_and_depends_on_the_seed():
    model = opinionated_model()
    prompt = torch.randint(0, 300, (2, 3))
    first = generate_all(model, prompt, use_cache=True, seed=1, max_new_tokens=20)
    again = generate_all(model, prompt, use_cache=True, seed=1, max_new_tokens=20)
    other = generate_all(model, prompt, use_cache=True, seed=2, max_new_tokens=20)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generation_stops_once_every_row_has_produced_the_stop_token():
    model = opinionated_model()
    prompt = torch.randint(0, 300, (2, 4))
    free = generate_all(model, prompt, use_cache=True, max_new_tokens=12, temperature=0.0)
    stop_token = int(free[0, 3])
    stopped = generate_all(model, prompt, use_cache=True, max_new_tokens=12, temperature=0.0, stop_token=stop_token)
    first_stop = [int((row == stop_token).nonzero()[0]) if (row == stop_token).any() else 12 for row in free]
    assert stopped.size(1) == min(max(first_stop) + 1, 12)
    for row, stop_at in enumerate(first_stop):
        assert torch.equal(stopped[row, : stop_at + 1], free[row, : stop_at + 1])
        assert (stopped[row, stop_at:] == stop_token).all()  # a finished row repeats it


def test_a_checkpoint_from_before_the_block_key_loads_as_gpt2():
    old = tiny_model()
    config_without_block = {key: value for key, value in dataclasses.asdict(old.config).items() if key != "block"}
    config = GPTConfig(**upgrade({"model_config": config_without_block})["model_config"])
    assert config.block == "gpt2"
    GPT(config).load_state_dict(old.state_dict())  # strict: every name and shape as saved


def test_value_embeddings_without_the_modern_block_are_refused():
    with pytest.raises(ValueError, match=r"value_embeddings are part of the modern block: set block='modern'"):
        tiny_config(block="gpt2", value_embeddings=True)


def test_value_embeddings_start_at_zero_and_each_layer_reads_its_own_table():
    model = tiny_model(block="modern", value_embeddings=True)
    tables = model.value_tables()
    assert len(tables) == 2 and all(not table.any() for table in tables)
    assert model.num_params() == tiny_model(block="modern").num_params() + 2 * 300 * 32
    without_zero_weights(model)
    idx = torch.randint(0, 300, (2, 16))
    before, _ = model(idx)
    with torch.no_grad():
        tables[1][idx[0, 3]] += 1.0  # one token's row in the last layer's table
    after, _ = model(idx)
    # the row is read where that token is, and seen by attention from there on only
    changed = (after - before).abs().amax(dim=-1) > 1e-6
    first = int((idx[0] == idx[0, 3]).nonzero()[0])
    assert changed[0, first:].all() and not changed[0, :first].any()


def test_the_modern_block_refuses_an_odd_head_size_naming_it():
    with pytest.raises(ValueError, match=r"modern block's rotary embedding needs an even head size, .* = 15"):
        tiny_config(n_embd=30, n_head=2, block="modern")


def test_padded_vocabulary_rows_start_at_zero_and_stay_there_through_training():
    model = tiny_model(vocab_size=257)
    optimizer = build_optimizer(model, "adamw", 1e-2, None, 0.1, (0.9, 0.95), "cpu")
    for _ in range(3):
        idx, targets = torch.randint(0, 257, (2, 4, 16))
        _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert (model.transformer.wte.weight[257:] == 0).all()
    assert (model.transformer.wte.weight[:257] != 0).all()


def test_a_context_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="17 tokens of context, more than block_size=16"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_padded_vocabulary_rows_are_never_sampled_and_do_not_change_the_loss():
    model = tiny_model(vocab_size=257).eval()  # the byte tokenizer's vocabulary
    assert model.transformer.wte.weight.size(0) == padded_vocab_size(257) == 320
    idx, targets = torch.randint(0, 257, (2, 4, 16))
    logits, loss = model(idx, targets)
    assert logits.size(-1) == 257
    prompt = idx[:, :3]
    before = generate_all(model, prompt, use_cache=True, max_new_tokens=30)
    with torch.no_grad():
        # if the padding rows took part, their huge logits would win every draw
        model.transformer.wte.weight[257:] = 1000 * torch.randn(63, 32)
    _, loss_after = model(idx, targets)
    after = generate_all(model, prompt, use_cache=True, max_new_tokens=30)
    assert loss_after.item() == loss.item()
    assert torch.equal(before, after)
    assert int(after.max()) < 257


def draws(logits_row, n=4000, **options):
    """The set of tokens drawn in n samples from one row of logits."""
    logits = torch.tensor(logits_row).log().expand(n, -1)
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next_token(logits, generator=generator, **options)
    return set(tokens.tolist())


def test_top_k_keeps_only_the_k_likeliest_tokens():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    assert draws(probs, temperature=1.0) == {0, 1, 2, 3, 4}
    assert draws(probs, temperature=1.0, top_k=3) == {1, 3, 4}
    assert draws(probs, temperature=1.0, top_k=1) == {1}


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    assert draws(probs, temperature=1.0, top_p=0.3) == {1}  # the likeliest alone reaches 0.3
    assert draws(probs, temperature=1.0, top_p=0.5) == {1, 3}
    assert draws(probs, temperature=1.0, top_p=0.75) == {1, 3, 4}
    assert draws(probs, temperature=1.0, top_k=2, top_p=0.99) == {1, 3}


def test_temperature_zero_picks_the_likeliest_token():
    assert draws([0.1, 0.4, 0.05, 0.3, 0.15], n=10, temperature=0.0) == {1}


@pytest.mark.parametrize("temperature, probabilities", [(0.5, [4 / 6, 1 / 6, 1 / 6]), (2.0, [0.414, 0.293, 0.293])])
def test_temperature_raises_each_probability_to_the_power_1_over_temperature(temperature, probabilities):
    # softmax(log p / T) is p^(1/T), renormalised: (1/2, 1/4, 1/4) sharpens to (4/6, 1/6, 1/6) at
    # T = 1/2 and flattens to (0.414, 0.293, 0.293) at T = 2; seeded, 20,000 draws
    logits = torch.tensor([0.5, 0.25, 0.25]).log().expand(20_000, -1)
    tokens = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens, minlength=3) / len(tokens)
    torch.testing.assert_close(shares, torch.tensor(probabilities), rtol=0, atol=0.01)


@pytest.mark.parametrize("options", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_options_are_refused(options):
    model = tiny_model()
    with pytest.raises(ValueError, match=next(iter(options))):
        next(model.generate(torch.zeros(1, 1, dtype=torch.long), 1, **options))


def test_gpt2_small_has_its_published_124_million_parameters():
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True, block="gpt2")
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(config)
    assert model.num_params() == 124_439_808  # the count of the released GPT-2 small
    # PaLM's 6N + 12 L C T, N the matrices that multiply: 12 C^2 per block and the head
    # (tied to the token embedding) at its padded 50304 rows
    n_matmul = 12 * 12 * 768**2 + 50304 * 768
    assert model.flops_per_token() == 6 * n_matmul + 12 * 12 * 768 * 1024


def test_gpt2_init_gives_the_projections_into_the_residual_stream_a_smaller_spread():
    # GPT-2 (its paper, 2.3): weights N(0, 0.02); the two projections each block adds to the
    # residual stream N(0, 0.02 / sqrt(2 n_layer)): 0.005 for 8 layers
    model = tiny_model(n_layer=8, n_embd=64)
    for name, p in model.transformer.h.named_parameters():
        if p.dim() == 2:
            expected = 0.005 if name.endswith("c_proj.weight") else 0.02
            assert p.std().item() == pytest.approx(expected, rel=0.1), name


def test_optimizer_decays_matrices_but_not_gains_and_biases():
    model = tiny_model(bias=True)
    optimizer = build_optimizer(model, "adamw", 1e-3, None, 0.1, (0.9, 0.95), "cpu")
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name


def test_peak_flops_is_known_only_for_listed_cards():
    assert peak_flops("cpu") is None
    assert peak_flops_of_card("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_of_card("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops_of_card("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of_card("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_of_card("NVIDIA H200") == 989e12
    assert peak_flops_of_card("NVIDIA L4") == 121e12
    assert peak_flops_of_card("NVIDIA GeForce RTX 4090") == 165.2e12
    assert peak_flops_of_card("NVIDIA L40S") == 362e12
    assert peak_flops_of_card("Tesla T4") == 65e12  # float16: T4 has no bfloat16
    # similar names of other cards must not borrow a figure
    for other in ["NVIDIA H100 NVL", "NVIDIA A10G", "NVIDIA L40", "NVIDIA GeForce RTX 4090 D"]:
        assert peak_flops_of_card(other) is None, other


def test_auto_picks_the_best_device_here_and_a_missing_one_is_refused_naming_those_there_are():
    devices = available_devices()
    assert devices[0] == "cpu"
    assert pick_device("auto") == next(device for device in ("cuda", "mps", "cpu") if device in devices)
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=rf"device 'cuda:99' is not on this machine, which has: auto, {devices[0]}"):
        pick_device("cuda:99")
