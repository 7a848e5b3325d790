"""owngpt/cpu.py: the library each linear layer's products go through on a CPU, chosen by
timing at the run's shapes, kept by a resumed run, and equal to nn.Linear's arithmetic; and
bfloat16 autocast, taken where the step timed faster, kept by a resumed run."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, cannot_run_here, read_metrics, stop_during_iteration, train_lines
from model import GPT, GPTConfig
from owngpt import cpu

pytestmark = pytest.mark.usefixtures("one_thread")

# a model whose block products are large enough to be timed (512 rows x 128 x 128 and wider),
# with a head too small to be (512 rows x 128 x 64 padded columns)
TIMED_SHAPE = dict(vocab_size=64, block_size=64, n_layer=1, n_head=4, n_embd=128)
TIMED_ROWS = 8 * 64
TIMED = {"128x384", "128x128", "128x512", "512x128"}


@pytest.fixture
def onednn():
    if not cpu.onednn_available():
        cannot_run_here("this PyTorch build has no oneDNN matrix multiply (an x86 build has)")


@pytest.mark.usefixtures("onednn")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("libraries", list(itertools.product(cpu.LIBRARIES, repeat=3)), ids="/".join)
def test_every_choice_of_libraries_gives_nn_linears_values_and_gradients(libraries, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 96, bias=bias)
    x = torch.randn(3, 5, 48, requires_grad=True)
    upstream = torch.randn(3, 5, 96)
    results = []
    for chosen in (None, libraries):
        if chosen:
            cpu.use_matmuls(layer, {"48x96": chosen})
            assert type(layer) is (torch.nn.Linear if chosen == ("mkl",) * 3 else cpu.ChosenLinear)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(upstream)
        results.append([y, x.grad, *(p.grad for p in layer.parameters())])
    assert len(results[0]) == (4 if bias else 3)
    for ours, reference in zip(*results):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # float32 sums in another order


@pytest.mark.usefixtures("onednn")
def test_chosen_libraries_keep_the_parameters_and_the_state_dict():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TIMED_SHAPE))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    cpu.use_matmuls(model, {"128x384": ("onednn", "mkl", "mkl"), "512x128": ("mkl", "mkl", "onednn")})
    assert [type(model.transformer.h[0].attn.c_attn), type(model.transformer.h[0].mlp.c_proj)] == [cpu.ChosenLinear] * 2
    assert model.transformer.h[0].attn.c_attn.libraries == ("onednn", "mkl", "mkl")
    assert type(model.transformer.h[0].mlp.c_fc) is torch.nn.Linear  # a shape the choice does not name
    assert list(model.parameters()) == parameters
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert model.state_dict().keys() == before.keys()


@pytest.mark.usefixtures("onednn")
def test_only_products_large_enough_are_timed_and_onednn_takes_those_it_beats(monkeypatch):
    model = GPT(GPTConfig(**TIMED_SHAPE))
    timed = []
    real_time_products = cpu.time_products
    monkeypatch.setattr(cpu, "time_products", lambda *shape: timed.append(shape) or real_time_products(*shape))
    monkeypatch.setattr(cpu, "FASTER_BY", 100.0)  # oneDNN wins every timed product
    assert cpu.choose_matmuls(model, TIMED_ROWS) == {shape: ("onednn",) * 3 for shape in TIMED}
    assert {f"{inputs}x{outputs}" for inputs, outputs, _ in timed} == TIMED and len(timed) == len(TIMED)
    monkeypatch.setattr(cpu, "FASTER_BY", 0.0)  # and none
    assert cpu.choose_matmuls(model, TIMED_ROWS) == "mkl"
    assert cpu.choose_matmuls(GPT(GPTConfig(**{**TIMED_SHAPE, "n_embd": 32})), TIMED_ROWS) == "mkl"  # none timed


@pytest.mark.usefixtures("onednn")
def test_a_resumed_run_multiplies_as_the_run_it_resumes_without_timing_again(tiny_dataset, tmp_path, train_here,
                                                                             monkeypatch):
    """The libraries chosen by timing are part of the run: the plan says them, the checkpoint
    keeps them, and the resumed run goes on with them, so it ends exactly as the run that never
    stopped (which, with oneDNN winning every timed product, chose the same)."""
    monkeypatch.setattr(cpu, "FASTER_BY", 100.0)
    flags = [f"--dataset={tiny_dataset}", "--n_layer=1", "--n_head=4", "--n_embd=128", "--block_size=64",
             "--max_iters=6", "--eval_interval=3"]
    whole = train_here(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert ("matrix multiplies by oneDNN (D) where it timed faster than MKL (M) at this run's shapes, per layer "
            "shape (output/input grad/weight grad): 128x384 D/D/D, 128x128 D/D/D, 128x512 D/D/D, 512x128 D/D/D, "
            "128x576 D/D/D") in whole.stdout  # the head: 516 tokens, padded to 576
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 2)
        assert train_here(*flags, f"--out_dir={tmp_path / 'halves'}").returncode == 0
    saved = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    assert saved["config"]["matmul"] == {shape: ("onednn",) * 3 for shape in TIMED | {"128x576"}}
    monkeypatch.setattr(cpu, "time_products", lambda *shape: pytest.fail("a resumed run timed the products again"))
    resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "128x384 D/D/D, 128x128 D/D/D, 128x512 D/D/D, 512x128 D/D/D, 128x576 D/D/D" in resumed.stdout
    losses = [[line["loss"] for line in train_lines(tmp_path / run)] for run in ("whole", "halves")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_forced_library_is_used_untimed_and_an_unknown_one_is_refused(tiny_dataset, tmp_path, train_here,
                                                                        monkeypatch):
    monkeypatch.setattr(cpu, "time_products", lambda *shape: pytest.fail("matmul=mkl timed the products"))
    forced = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=1", "--matmul=mkl")
    assert forced.returncode == 0, forced.stderr
    assert "matrix multiplies by MKL (matmul=mkl)" in forced.stdout
    assert read_metrics(tmp_path)[0]["iter"] == 0
    refused = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--matmul=blas")
    assert refused.returncode == 1
    assert "matmul" in refused.stderr and "one of auto, mkl, onednn, got 'blas'" in refused.stderr


# ----------------------------------------------------------------------------- bfloat16
# the quick start's model: a step large enough to be timed (2.3e10 FLOPs at batch 16 x 128)
QUICK_START = dict(vocab_size=8196, block_size=128, n_layer=4, n_head=4, n_embd=128)


def test_bfloat16_is_timed_only_for_a_large_step_and_taken_only_where_it_was_faster(monkeypatch):
    small = GPT(GPTConfig(**TIMED_SHAPE))
    with monkeypatch.context() as patch:
        patch.setattr(cpu, "seconds_of", lambda call: pytest.fail("a step below BF16_UNTIMED_FLOPS was timed"))
        assert cpu.choose_dtype(small, 8, 64) == ("float32", None)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**QUICK_START, dropout=0.1))  # whose forward draws random numbers
    random_state = torch.get_rng_state()
    monkeypatch.setattr(cpu, "BF16_FASTER_BY", 100.0)  # bfloat16 wins whatever the times
    dtype, ratio = cpu.choose_dtype(model, 16, 128)
    assert dtype == "bfloat16" and ratio > 0
    assert all(parameter.grad is None for parameter in model.parameters())  # the timing's gradients are gone
    assert torch.equal(torch.get_rng_state(), random_state)  # and the run's random numbers as they were
    monkeypatch.setattr(cpu, "BF16_FASTER_BY", 0.0)  # and never
    assert cpu.choose_dtype(model, 16, 128)[0] == "float32"


def test_a_cpu_held_to_avx2_which_emulates_bfloat16_keeps_float32():
    """ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and MKL_ENABLE_INSTRUCTIONS hold PyTorch's kernels,
    oneDNN and MKL to AVX2, which has no bfloat16 dot product: its steps take many times
    float32's (8-13x here; less beside a busy process, which slows float32's threads most)."""
    script = ("import torch; from model import GPT, GPTConfig; from owngpt import cpu; "
              f"print(*cpu.choose_dtype(GPT(GPTConfig(**{QUICK_START!r})), 16, 128))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
           "OMP_NUM_THREADS": "1"}  # as the one_thread fixture, in that process
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    dtype, ratio = done.stdout.split()
    assert dtype == "float32" and float(ratio) > 1, done.stdout


def test_a_run_that_chose_bfloat16_says_it_trains_in_it_and_resumes_in_it_untimed(tiny_dataset, tmp_path, train_here,
                                                                                 monkeypatch):
    """The dtype chosen by timing is part of the run, as the libraries are: the plan says it, the
    checkpoint keeps it, and the resumed run computes in it without timing again, so it ends
    exactly as the run that never stopped; a float32 run's losses differ from both."""
    monkeypatch.setattr(cpu, "BF16_UNTIMED_FLOPS", 0.0)
    monkeypatch.setattr(cpu, "BF16_FASTER_BY", 100.0)
    flags = [f"--dataset={tiny_dataset}", "--max_iters=6", "--eval_interval=3", "--matmul=mkl"]
    whole = train_here(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert "device cpu, bfloat16, compile=False; bfloat16 autocast: its step timed " in whole.stdout
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 2)
        assert train_here(*flags, f"--out_dir={tmp_path / 'halves'}").returncode == 0
    assert torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)["config"]["dtype"] == "bfloat16"
    monkeypatch.setattr(cpu, "choose_dtype", lambda *shape: pytest.fail("a resumed run timed bfloat16 again"))
    resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "device cpu, bfloat16, compile=False" in resumed.stdout
    in_float32 = train_here(*flags, f"--out_dir={tmp_path / 'float32'}", "--dtype=float32")
    assert in_float32.returncode == 0 and "device cpu, float32, compile=False" in in_float32.stdout
    losses = [[line["loss"] for line in train_lines(tmp_path / run)] for run in ("whole", "halves", "float32")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert losses[2] != losses[0]


# ----------------------------------------------------------------------------- dropout
def test_byte_dropout_drops_its_rate_in_1_256ths_from_every_byte_of_a_draw_and_masks_the_gradient():
    torch.manual_seed(0)
    layer = cpu.ByteDropout(0.2)
    inputs = torch.randn(512, 1024, requires_grad=True)
    outputs = layer(inputs)
    dropped = outputs == 0
    rate, scale = 51 / 256, 256 / 205  # 0.2 rounded to 51/256; the kept scaled to keep the mean
    # each of the 8 bytes of a 64-bit draw is a fair byte (65,536 draws: a rate's sd is 0.0016)
    assert dropped.view(-1, 8).float().mean(dim=0).sub(rate).abs().max() < 0.01
    assert torch.allclose(outputs[~dropped], inputs[~dropped] * scale)
    outputs.backward(torch.ones_like(outputs))
    assert torch.equal(inputs.grad == 0, dropped) and torch.allclose(inputs.grad[~dropped], torch.tensor(scale))
    assert layer(torch.ones(4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer.eval()
    assert layer(inputs) is inputs


def test_a_cpu_run_draws_its_dropout_masks_with_byte_dropout(tiny_dataset, tmp_path, train_here, monkeypatch):
    calls, forward = [], cpu.ByteDropout.forward
    monkeypatch.setattr(cpu.ByteDropout, "forward", lambda layer, x: calls.append(layer.p) or forward(layer, x))
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=2", "--dropout=0.2",
                          "--n_layer=2")
    assert finished.returncode == 0, finished.stderr
    assert len(calls) >= 2 * (1 + 2 * 2) and set(calls) == {0.2}  # the embedding's and two per block, each step


def test_eval_only_evaluates_untimed_in_the_dtype_its_checkpoints_run_trained_in(tiny_dataset, tmp_path, train_here,
                                                                               monkeypatch):
    """So that it prints the val loss the run's own last evaluation did; a flag still wins."""
    monkeypatch.setattr(cpu, "BF16_UNTIMED_FLOPS", 0.0)
    monkeypatch.setattr(cpu, "BF16_FASTER_BY", 100.0)
    trained = train_here(f"--dataset={tiny_dataset}", "--max_iters=6", "--eval_interval=3", f"--out_dir={tmp_path}")
    assert trained.returncode == 0 and "device cpu, bfloat16" in trained.stdout, trained.stderr
    monkeypatch.setattr(cpu, "choose_dtype", lambda *shape: pytest.fail("eval_only timed bfloat16"))
    monkeypatch.setattr(cpu, "choose_matmuls", lambda *shape: pytest.fail("eval_only timed the libraries"))
    last = [line["val_loss"] for line in read_metrics(tmp_path) if "val_loss" in line][-1]
    for dtype, same in (("auto", True), ("float32", False)):
        evaluated = train_here(f"--dataset={tiny_dataset}", f"--init_from={tmp_path / 'ckpt.pt'}", "--eval_only=True",
                               f"--dtype={dtype}")
        assert evaluated.returncode == 0, evaluated.stderr
        assert (f"val loss {last:.4f} |" in evaluated.stdout) == same, (last, evaluated.stdout)
