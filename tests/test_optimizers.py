"""optimizers.py: Muon's update is a near-orthogonal matrix of the gradient's directions,
Muon with AdamW saves and loads as one optimizer, and the cosine schedule's rates."""
import io

import pytest
import torch

from model import GPT, GPTConfig
from owngpt.optimizers import Muon, build_optimizer, learning_rate_at, orthogonalise
import train

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"tall": (64, 16), "wide": (16, 64)}


def random_matrix(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def all_near_1(singular_values):
    """The quintic iteration leaves them in about [0.7, 1.2] (optimizers.py), not at 1 exactly."""
    return 0.5 <= singular_values.min() and singular_values.max() <= 1.5


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_orthogonalise_sets_every_singular_value_near_1_and_keeps_the_directions(shape):
    update = random_matrix(shape)
    result = orthogonalise(update)
    assert result.shape == update.shape and result.dtype == update.dtype
    assert all_near_1(torch.linalg.svdvals(result))
    # U^T result V is diagonal for the singular vectors U, V of update: only the sizes changed
    U, _, Vh = torch.linalg.svd(update, full_matrices=False)
    in_its_directions = U.T @ result @ Vh.T
    off_diagonal = in_its_directions - torch.diag(in_its_directions.diagonal())
    assert off_diagonal.abs().max() < 1e-3


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_one_muon_step_moves_a_matrix_by_lr_times_scale_times_its_orthogonalised_gradient(shape):
    weight = torch.nn.Parameter(random_matrix(shape, seed=1))
    before = weight.detach().clone()
    weight.grad = random_matrix(shape, seed=2)
    optimizer = Muon([weight], lr=0.02)
    optimizer.step()
    # a tall matrix's update is scaled by sqrt(rows / cols) (here 2), a wide one's by 1
    scale = max(1, shape[0] / shape[1]) ** 0.5
    step = (before - weight.detach()) / (0.02 * scale)
    assert all_near_1(torch.linalg.svdvals(step))
    # the first step's momentum is the gradient itself; Nesterov adds it again, which
    # orthogonalising does not see (it normalises)
    torch.testing.assert_close(step, orthogonalise(weight.grad), rtol=0, atol=1e-5)
    assert torch.equal(optimizer.state[weight]["momentum_buffer"], weight.grad)


def muon_and_adamw(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16, block="modern"))
    return model, build_optimizer(model, "muon", learning_rate=1e-3, muon_lr=0.02, weight_decay=0.1,
                                  betas=(0.9, 0.95), device_type="cpu", embedding_lr=0.3)


def take_a_step(model, optimizer, seed):
    tokens = torch.randint(100, (2, 9), generator=torch.Generator().manual_seed(seed))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_muon_and_adamw_state_round_trips_and_param_groups_show_the_loaded_groups():
    model, optimizer = muon_and_adamw(seed=0)
    for step in range(2):
        take_a_step(model, optimizer, seed=step)
    for index, group in enumerate(optimizer.param_groups):  # rates a schedule set, as train.py does
        group["lr"] = 0.001 * (index + 1)
    # through bytes, as a checkpoint does: torch's load_state_dict keeps the very tensors it is
    # given, so a live state_dict would leave both optimizers updating the same buffers
    file = io.BytesIO()
    torch.save(optimizer.state_dict(), file)
    saved = torch.load(io.BytesIO(file.getvalue()), weights_only=True)
    assert set(saved) == {"muon", "adamw"}

    copy, loaded = muon_and_adamw(seed=1)
    copy.load_state_dict(model.state_dict())
    loaded.load_state_dict(saved)
    assert [group["lr"] for group in loaded.param_groups] == [0.001, 0.002, 0.003, 0.004]
    assert [group["lr_key"] for group in loaded.param_groups] == ["muon_lr", "learning_rate", "learning_rate",
                                                                  "embedding_lr"]
    # param_groups are the parts' own groups, so a rate set through them is the rate used
    assert loaded.param_groups[0] is loaded.parts["muon"].param_groups[0]
    take_a_step(model, optimizer, seed=2)
    take_a_step(copy, loaded, seed=2)
    for (name, p), q in zip(model.named_parameters(), copy.parameters()):
        assert torch.equal(p, q), name


def test_the_value_embeddings_learn_with_the_token_embedding_at_embedding_lr_without_decay():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=2, n_head=2, n_embd=16, block="modern",
                          value_embeddings=True))
    optimizer = build_optimizer(model, "muon", learning_rate=1e-3, muon_lr=0.02, weight_decay=0.1,
                                betas=(0.9, 0.95), device_type="cpu", embedding_lr=0.3)
    muon, head, vectors, tables = optimizer.param_groups
    assert tables["params"] == [model.transformer.wte.weight, *model.value_tables()]
    assert (tables["lr"], tables["weight_decay"]) == (0.3, 0.0)
    assert head["params"] == [model.lm_head.weight] and not vectors["params"]
    assert len(muon["params"]) == 2 * 4  # each block's qkv, attention output, MLP in and out


# ----------------------------------------------------------------------------- the schedule
def test_cosine_warms_up_linearly_then_falls_along_half_a_cosine_to_min_lr():
    cfg = train.read_config(["--lr_schedule=cosine", "--warmup_iters=4", "--learning_rate=1e-3", "--min_lr=1e-4",
                             "--max_iters=104"])
    rate = lambda iteration: learning_rate_at(iteration, cfg)
    assert [rate(i) for i in range(5)] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # (i + 1) / 5 of the peak
    # from the peak at iteration 4 to min_lr at 104: a quarter of the way, (1 + cos(pi / 4)) / 2 of the range left
    assert rate(29) == pytest.approx(1e-4 + 9e-4 * (1 + 2 ** -0.5) / 2)
    assert rate(54) == pytest.approx(5.5e-4)  # halfway: the middle of the range
    assert rate(79) == pytest.approx(1e-4 + 9e-4 * (1 - 2 ** -0.5) / 2)
    assert rate(104) == rate(500) == 1e-4
