"""plan.py and owngpt/costs.py: the memory model against torch's allocator, the time model's
FLOPs against torch's FLOP counter, GPT-2 small's figures against its config's docstring, and
the plan's text."""
import json
import re
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import ROOT
from model import GPT, GPTConfig
from owngpt import costs, flags
from owngpt.optimizers import build_optimizer
import plan
import train

# A training step's peak memory as torch's CPU allocator saw it: the profiler records every
# allocation and free ([memory] events); their running sum's maximum is the peak, exact and
# independent of the machine's load and of how malloc caches. Model and optimizer are made
# inside the window, so everything the step holds is counted; two steps, so the optimizer's
# state exists at the second.
MEASURE_PEAK = """
import json, sys
import torch
from torch.profiler import ProfilerActivity, profile
from model import GPT, GPTConfig
from owngpt.optimizers import build_optimizer
torch.set_num_threads(1)
shape = json.loads(sys.argv[1])
batch_size, optimizer_kind = shape.pop("batch_size"), shape.pop("optimizer")
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=shape.pop("half"))
peaks = {}
for checkpointing in (False, True):
    config = GPTConfig(**shape, gradient_checkpointing=checkpointing)
    tokens = torch.randint(config.vocab_size, (batch_size, config.block_size + 1))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        model = GPT(config)
        optimizer = build_optimizer(model, optimizer_kind, 1e-3, 0.02, 0.1, (0.9, 0.95), "cpu",
                                    0.3 if config.block == "modern" else None)
        for _ in range(2):
            with autocast:
                _, loss = model(tokens[:, :-1], tokens[:, 1:])  # `_` holds the logits, as in train.py
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        del model, optimizer, loss, _
    live = peak = 0
    for _, size in sorted((event.start_ns(), event.nbytes()) for event in profiler.profiler.kineto_results.events()
                          if event.name() == "[memory]"):
        live += size
        peak = max(peak, live)
    peaks[checkpointing] = peak
print(json.dumps([peaks[False], peaks[True]]))
"""

SHAPES = {  # where the activations dominate, where the weights and optimizer do, and in between; float32
    # as train.py computes on CPU, and once under bfloat16 autocast, as on GPUs
    "modern, value embeddings, muon": dict(block="modern", value_embeddings=True, n_layer=2, n_head=4, n_embd=128,
                                           block_size=128, vocab_size=1000, batch_size=8, optimizer="muon", half=False),
    "gpt2, adamw": dict(block="gpt2", n_layer=6, n_head=6, n_embd=384, block_size=128, vocab_size=2000,
                        batch_size=4, optimizer="adamw", half=False),
    "modern, adamw, wide": dict(block="modern", n_layer=3, n_head=8, n_embd=512, block_size=64, vocab_size=512,
                                batch_size=2, optimizer="adamw", half=False),
    "gpt2, adamw, bf16 autocast": dict(block="gpt2", n_layer=4, n_head=4, n_embd=256, block_size=128,
                                       vocab_size=8000, batch_size=8, optimizer="adamw", half=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SHAPES)
def test_memory_model_is_within_20_percent_of_the_allocators_peak(name):
    shape = dict(SHAPES[name])
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, json.dumps(shape)], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    batch_size, optimizer, half = shape.pop("batch_size"), shape.pop("optimizer"), shape.pop("half")
    for checkpointing, peak in zip((False, True), measured):
        model = costs.meta_model(GPTConfig(**shape))
        predicted = costs.memory_per_gpu(model, batch_size, optimizer, half,
                                         gradient_checkpointing=checkpointing)["total"]
        print(f"{name}, gradient_checkpointing={checkpointing}: predicted {predicted / 2**20:.1f} MiB, "
              f"measured {peak / 2**20:.1f} MiB ({predicted / peak:.3f})")
        assert predicted == pytest.approx(peak, rel=0.2), (checkpointing, predicted, peak)


@pytest.mark.parametrize("block, optimizer, value_embeddings, checkpointing", [
    ("gpt2", "adamw", False, False), ("gpt2", "adamw", False, True),
    ("modern", "muon", False, False), ("modern", "muon", True, True)])
def test_the_time_models_flops_are_those_torch_counts_in_a_training_step(block, optimizer, value_embeddings,
                                                                         checkpointing, one_thread):
    """The time model is FLOPs / (peak x MFU). Its FLOPs (6N and attention per token, the
    blocks recomputed under checkpointing, Muon's Newton-Schulz steps) against torch's FLOP
    counter over one training step as train.py takes it. The counter sees matmuls it has a
    formula for: the attention as plain batched matmuls (the math kernel), which changes no FLOPs."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block=block, n_layer=2, n_head=4, n_embd=256, block_size=64, vocab_size=300,
                        value_embeddings=value_embeddings, gradient_checkpointing=checkpointing))
    optimizer_instance = build_optimizer(gpt, optimizer, 1e-3, 0.02, 0.1, (0.9, 0.95), "cpu",
                                         0.3 if block == "modern" else None)
    tokens = torch.randint(300, (4, 65))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = gpt(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer_instance.step()
    predicted = costs.flops_per_iter(gpt, tokens[:, 1:].numel(), optimizer, checkpointing)
    assert predicted == counter.get_total_flops(), counter.get_flop_counts()["Global"]


def test_gpt2_small_on_8_h100s_takes_what_its_config_says():
    cfg = plan.read_config([str(ROOT / "config/train_gpt2_124m.py"), "--vocab_size=50257"])
    model = plan.model_of(cfg, 50257)
    h100, a100 = costs.card_named("H100"), costs.card_named("A100 80GB")
    per_iter, seconds = costs.predicted_seconds(model, cfg, 8, h100.peak_flops, 0.4)
    per_gpu_tokens_per_s = 0.4 * h100.peak_flops / model.flops_per_token()
    docstring = " ".join((ROOT / "config/train_gpt2_124m.py").read_text().split())  # lines joined
    assert f"~{model.flops_per_token() / 1e9:.2f} GFLOPs per token" in docstring
    assert f"~{per_gpu_tokens_per_s / 1e3:.0f}K tokens/s" in docstring
    assert f"~{per_iter:.2f} s per iteration" in docstring
    assert f"~{5 * round(seconds / 300)} minutes for the run" in docstring
    assert "about three times longer" in docstring and round(h100.peak_flops / a100.peak_flops) == 3


def test_the_plan_of_the_demo_gives_memory_time_and_example_prices_for_every_card(capsys):
    plan.main([str(ROOT / "config/train_demo.py"), "--dataset=no_such_folder"])
    text = capsys.readouterr().out
    assert "vocabulary 8,192 (GPTConfig's default: no dataset 'no_such_folder' here" in text
    assert "memory per GPU at batch_size=16 x block_size=128" in text and "8 GPUs FSDP" in text
    for card in costs.CARDS:
        assert re.search(rf"^  {re.escape(card.name)} ", text, re.MULTILINE), card.name
    assert "not quotes" in text and "Apple M-series" in text
    assert "8 GPUs need gradient_accumulation_steps=1 to be a multiple of 8" in text


def test_with_a_card_and_a_gpu_count_the_plan_prints_the_skypilot_and_slurm_lines_that_launch_the_run(capsys,
                                                                                                      monkeypatch):
    monkeypatch.chdir(ROOT)
    plan.main(["config/train_gpt2_124m.py", "--card=A100 80GB", "--gpus=16", "--vocab_size=50257", "--max_iters=100"])
    sky, slurm = capsys.readouterr().out.splitlines()[-2:]
    train_args = "config/train_gpt2_124m.py --max_iters=100"  # plan.py's own keys left out
    assert sky == f"  sky jobs launch launch/sky.yaml --gpus A100-80GB:8 --num-nodes 2 --env TRAIN_ARGS='{train_args}'"
    assert slurm == f"  sbatch --nodes=2 --gpus-per-node=8 launch/train_slurm.sbatch {train_args}"
    assert train.read_config(shlex.split(train_args)).max_iters == 100
    plan.main(["config/train_gpt2_124m.py", "--card=H100", "--gpus=12"])
    assert capsys.readouterr().out.endswith("launch: 12 GPUs do not fill nodes of 8: ask for a multiple of 8\n")


def test_the_plan_refuses_an_unknown_card_naming_those_it_knows():
    with pytest.raises(flags.UserError, match="--card=B300: expected one of H200, H100, "):
        plan.read_config(["--card=B300"])


def test_a_budget_buys_the_deepest_model_it_can_train_on_20_tokens_per_parameter():
    flops = 5.7e19
    model, tokens = costs.compute_optimal_shape(flops, 20, 50257, "gpt2", 1024)
    assert tokens == 20 * model.num_params()
    assert model.flops_per_token() * tokens <= flops
    deeper = costs.meta_model(GPTConfig(n_layer=model.config.n_layer + 1, n_head=model.config.n_layer + 1,
                                        n_embd=64 * (model.config.n_layer + 1), block_size=1024, vocab_size=50257,
                                        block="gpt2"))
    assert deeper.flops_per_token() * 20 * deeper.num_params() > flops
    lines = plan.budget_lines(plan.read_config(["--budget_usd=100", "--block=gpt2", "--block_size=1024"]), 50257)
    assert f"--n_layer={model.config.n_layer} --n_head={model.config.n_layer} --n_embd={model.config.n_embd}" in lines[2]


def test_largest_batch_is_the_last_that_fits():
    model = costs.meta_model(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    capacity = 24 * 2**30 * costs.USABLE
    largest = costs.largest_batch(model, capacity, optimizer="muon", half=True)
    assert costs.memory_per_gpu(model, largest, "muon", half=True)["total"] <= capacity
    assert costs.memory_per_gpu(model, largest + 1, "muon", half=True)["total"] > capacity


def test_fsdp_shards_weights_gradients_and_optimizer_state_and_ddp_adds_its_buckets():
    model = costs.meta_model(GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257,
                                       block="gpt2"))
    one = costs.memory_per_gpu(model, 1, "adamw", half=True)
    ddp = costs.memory_per_gpu(model, 1, "adamw", half=True, gpus=8)
    fsdp = costs.memory_per_gpu(model, 1, "adamw", half=True, gpus=8, parallelism="fsdp")
    assert ddp["ddp_buckets"] == one["gradients"] and ddp["total"] > one["total"]
    assert fsdp["optimizer"] == one["optimizer"] / 8
    assert fsdp["total"] < one["total"] / 4 and fsdp["activations"] == one["activations"]


def test_the_eta_counts_the_evaluations_train_py_runs():
    for max_iters, eval_interval, start in ((100, 25, 0), (101, 25, 0), (100, 25, 30), (7, 10, 3)):
        ran = sum(1 for iteration in range(start + 1, max_iters + 1)
                  if iteration % eval_interval == 0 or iteration == max_iters) + (start == 0)
        assert costs.evaluations(max_iters, eval_interval, start) == ran


def test_plan_reads_train_pys_defaults_from_its_text():
    assert flags.defaults_of(ROOT / "train.py") == train.DEFAULTS


def test_the_plan_line_at_the_start_of_a_run_uses_the_same_arithmetic(capsys, tmp_path):
    cfg = train.read_config(["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--device=cpu",
                             f"--out_dir={tmp_path}"])
    model = GPT(GPTConfig(**{key: getattr(cfg, key) for key in train.MODEL_KEYS}, vocab_size=300))
    runtime = SimpleNamespace(world_size=1, is_main=True, device=torch.device("cpu"), dtype=torch.float32,
                              peak_flops=None)
    train.RunLog(cfg, runtime, None).plan(model, cfg, runtime)
    memory = costs.memory_per_gpu(model, cfg.batch_size, cfg.optimizer, half=False)
    assert f"memory per process ~{costs.memory_text(memory['total'])}" in capsys.readouterr().out


def test_the_plan_line_gives_memory_under_ddp_and_fsdp_and_suggests_fsdp_when_ddp_does_not_fit():
    model = costs.meta_model(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257))
    memory = {kind: costs.memory_per_gpu(model, 8, "adamw", half=True, gpus=8, parallelism=kind)
              for kind in ("ddp", "fsdp")}
    for part in ("weights", "gradients", "optimizer"):  # sharded over 8, but for the block being gathered
        assert memory["fsdp"][part] < memory["ddp"][part] / 4
    between = (memory["fsdp"]["total"] + memory["ddp"]["total"]) / 2 / costs.USABLE
    assert "--parallelism=fsdp needs ~" in costs.parallelism_advice(memory, "ddp", between)
    assert costs.parallelism_advice(memory, "ddp", 2 * memory["ddp"]["total"]) is None
    assert "lower batch_size" in costs.parallelism_advice(memory, "fsdp", memory["fsdp"]["total"] / 2)
