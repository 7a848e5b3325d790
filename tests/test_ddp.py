"""Two processes under torchrun on CPU (gloo): their gradients and optimizer step (AdamW, or
Muon with AdamW) equal one process's on the same global batch, and a preempted two-process
run saves and resumes without losing or repeating an iteration."""
import json
import math
import re
import signal
import subprocess

import pytest
import torch

from helpers import ONE_THREAD, ROOT, TINY_MODEL, TORCHRUN, eval_lines, read_metrics, run_train, train_lines, wait_until
from owngpt import runtime
import train

# Run under torchrun: each rank does its share of a global batch through train.py's own
# forward_backward (DDP, no_sync on all but the last micro-step) and takes an optimizer
# step; rank 0 then does the whole batch and the step in one process and writes the largest
# differences between the gradients and between the weights, the ranks' weights included.
GRADIENT_SCRIPT = """
import copy, json, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
from owngpt.optimizers import build_optimizer
from owngpt.runtime import leave, setup_runtime
import train
from torch.nn.parallel import DistributedDataParallel

cfg = train.read_config(["--device=cpu", "--gradient_accumulation_steps=4"])
runtime = setup_runtime(cfg)
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, block={block!r},
                      value_embeddings={block!r} == "modern"))
with torch.no_grad():  # the modern block's zero-initialised matrices would leave most weights without a gradient
    for p in model.parameters():
        if p.dim() == 2 and not p.any():
            p.normal_(std=0.02)
single, initial = copy.deepcopy(model), copy.deepcopy(model)
tokens = torch.randint(100, (4, 3, 17), generator=torch.Generator().manual_seed(1))  # 4 micro-batches of 3
# a third of the targets left out of the loss, as a chat dataset's mask does
masked = torch.rand(4, 3, 16, generator=torch.Generator().manual_seed(2)) < 0.3
batches = [(batch[:, :-1], batch[:, 1:].masked_fill(mask, -1)) for batch, mask in zip(tokens, masked)]
optimizer_of = lambda model: build_optimizer(model, {optimizer!r}, 1e-3, 0.02, 0.1, (0.9, 0.95), "cpu")

mine = iter(batches[runtime.rank::runtime.world_size])
train.forward_backward(DistributedDataParallel(model), lambda: next(mine), micro_steps=2,
                       autocast=runtime.autocast, scaler=None, is_ddp=True)
gradients = [p.grad.clone() for p in model.parameters()]
optimizer_of(model).step()
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
rank_0_weights = weights.clone()
dist.broadcast(rank_0_weights, src=0)
between_ranks = (weights - rank_0_weights).abs().max()
dist.all_reduce(between_ranks, op=dist.ReduceOp.MAX)
if runtime.rank == 0:
    everything = iter(batches)
    train.forward_backward(single, lambda: next(everything), micro_steps=4, autocast=runtime.autocast,
                           scaler=None, is_ddp=False)
    difference = max((a - b.grad).abs().max().item() for a, b in zip(gradients, single.parameters()))
    largest = max(p.grad.abs().max().item() for p in single.parameters())
    optimizer_of(single).step()
    weight_difference = max((a - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters()))
    moved = max((a - b).abs().max().item() for a, b in zip(single.parameters(), initial.parameters()))
    with open({result!r}, "w") as file:
        json.dump({{"difference": difference, "largest": largest, "weight_difference": weight_difference,
                   "moved": moved, "between_ranks": between_ranks.item()}}, file)
leave(None)  # destroys the group and exits as train.py does (see its docstring)
"""


@pytest.mark.slow
@pytest.mark.parametrize("block, optimizer", [("gpt2", "adamw"), ("modern", "muon")], ids=["gpt2_adamw", "modern_muon"])
def test_two_processes_compute_the_gradients_and_the_step_of_one_process_on_the_same_global_batch(block, optimizer,
                                                                                                   tmp_path):
    script, result = tmp_path / "gradients.py", tmp_path / "result.json"
    script.write_text(GRADIENT_SCRIPT.format(root=str(ROOT), result=str(result), block=block, optimizer=optimizer))
    finished = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert finished.returncode == 0, finished.stderr
    outcome = json.loads(result.read_text())
    assert outcome["largest"] > 1e-3
    assert outcome["difference"] <= 1e-6 * outcome["largest"]
    assert outcome["between_ranks"] == 0  # every rank steps from the same averaged gradients
    assert outcome["moved"] > 1e-4
    assert outcome["weight_difference"] <= 1e-3 * outcome["moved"]


def test_gradient_accumulation_that_does_not_divide_by_the_processes_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for two processes
    cfg = train.read_config(["--device=cpu", "--gradient_accumulation_steps=3"])
    with pytest.raises(runtime.RuntimeSetupError, match=r"gradient_accumulation_steps=3 does not divide by the 2 processes"):
        runtime.setup_runtime(cfg)


@pytest.mark.slow
def test_a_preempted_two_process_run_saves_and_resumes_without_losing_an_iteration(tiny_chat_dataset, tmp_path):
    """On a chat dataset: the rows of packed conversations and their masks resume as windows do."""
    flags = [f"--dataset={tiny_chat_dataset}", "--out_dir=out", "--gradient_accumulation_steps=2",
             "--eval_interval=1000"]
    out_dir, log = tmp_path / "out", tmp_path / "first.log"
    # torchrun passes SIGTERM on to both ranks, as a cluster scheduler's preemption does
    first = subprocess.Popen([*TORCHRUN, str(ROOT / "train.py"), *TINY_MODEL, *flags, "--max_iters=100000"],
                             cwd=tmp_path, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ONE_THREAD)
    wait_until(lambda: (out_dir / "metrics.jsonl").exists() and len(train_lines(out_dir)) >= 3, timeout=120)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    stopped_at = int(re.search(r"stopped at iteration (\d+):", log.read_text())[1])
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == stopped_at and checkpoint["data"]["world_size"] == 2
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["loader"], checkpoint["rng"][1]["loader"])

    second = run_train(*flags, f"--max_iters={stopped_at + 3}", "--init_from=resume", cwd=tmp_path, torchrun=True)
    assert second.returncode == 0, second.stderr
    assert f"at iteration {stopped_at}, exactly" in second.stdout
    lines = train_lines(out_dir)
    assert [line["iter"] for line in lines] == list(range(1, stopped_at + 4))
    # the modern block's zero head guesses uniformly at first: ln 516 (the BPE's 512 ids and the
    # 4 chat tokens) on each rank, and so their mean
    assert lines[0]["loss"] == pytest.approx(math.log(516), rel=1e-6)
    evals = eval_lines(out_dir)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


@pytest.mark.slow
def test_rank_0_samples_alone_and_both_ranks_train_exactly_as_without_samples(tiny_dataset, tmp_path):
    # rank 0 generates while rank 1 goes on to the next step's all-reduce and waits for it there
    flags = [f"--dataset={tiny_dataset}", "--gradient_accumulation_steps=2", "--dropout=0.1", "--max_iters=4",
             "--eval_interval=2"]
    for sample in (True, False):
        finished = run_train(*flags, f"--out_dir={tmp_path / str(sample)}", f"--sample_every_eval={sample}",
                             torchrun=True)
        assert finished.returncode == 0, finished.stderr
        assert finished.stdout.count("sample at iter") == (3 if sample else 0)
    with_samples, without = read_metrics(tmp_path / "True"), read_metrics(tmp_path / "False")
    assert [line["iter"] for line in with_samples if "sample" in line] == [0, 2, 4]
    losses = lambda lines: [(line.get("loss"), line.get("val_loss")) for line in lines if "sample" not in line]
    assert losses(with_samples) == losses(without)
    states = [torch.load(tmp_path / str(sample) / "ckpt.pt", weights_only=True)["rng"] for sample in (True, False)]
    for rank in (0, 1):
        assert all(torch.equal(states[0][rank][key], states[1][rank][key]) for key in ("torch", "loader"))
