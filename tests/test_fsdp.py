"""FSDP (parallelism=fsdp) with two processes under torchrun on CPU (gloo): its weights and
optimizer state equal one process's on the same global batch, bit for bit; its checkpoint is
the one format every reader knows; a run stopped and resumed equals one that was not."""
import json
import shutil
import subprocess

import pytest
import torch

from helpers import MODERN_RECIPE, ONE_THREAD, ROOT, TORCHRUN, read_metrics, run_sample, run_train, train_lines
from owngpt.checkpoint import MANIFEST_FILE, load_checkpoint_file

# Run under torchrun: every rank builds the same model, shards it as train.py does and takes
# 3 steps, each of 2 micro-steps through train.py's forward_backward (a reduce-scatter at
# each). Rank 0 then takes the same steps in one process and writes the largest differences
# of the weights and of the optimizer's state. Exactness needs the one-process reference to
# add in FSDP's order: per micro-step, the mean of the two ranks' gradients (a sum of two
# terms and a halving, both exact), added to the gradient so far. A reference that runs the
# 4 micro-batches one after another adds in another order and differs by ~1e-8.
FSDP_SCRIPT = """
import copy, json, math, sys
import torch
sys.path.insert(0, {root!r})
from model import GPT, GPTConfig
from owngpt.optimizers import build_optimizer
from owngpt.parallel import clip_gradients, full_model_state, full_state, wrap_model
from owngpt.runtime import leave, setup_runtime
import train

cfg = train.read_config(["--device=cpu", "--gradient_accumulation_steps=4", "--parallelism=fsdp"])
runtime = setup_runtime(cfg)
tensors = lambda state: [v for v in (state.values() if isinstance(state, dict) else state)
                         for v in (tensors(v) if isinstance(v, (dict, list)) else [v]) if torch.is_tensor(v)]


def case(max_norm):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32, block={block!r},
                          value_embeddings={block!r} == "modern"))  # an odd vocabulary: uneven shards
    with torch.no_grad():  # the modern block's zero-initialised matrices would leave most weights without a gradient
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(std=0.02)
    single = copy.deepcopy(model)
    model_before = {{k: v.clone() for k, v in model.state_dict().items()}}
    optimizer_of = lambda model: build_optimizer(model, {optimizer!r}, 1e-3, 0.02, 0.1, (0.9, 0.95), "cpu", 0.3)
    sharded, _ = wrap_model(model, "fsdp", runtime)
    optimizer = optimizer_of(sharded)  # after sharding: it steps the local rows
    tokens = torch.randint(101, (3, 4, 3, 17), generator=torch.Generator().manual_seed(1))  # 3 steps x 4 micro-batches
    steps = [[(batch[:, :-1], batch[:, 1:]) for batch in step] for step in tokens]
    for step in steps:
        mine = iter(step[runtime.rank::runtime.world_size])
        train.forward_backward(sharded, lambda: next(mine), micro_steps=2, autocast=runtime.autocast, scaler=None,
                               is_ddp=False)
        clip_gradients(list(sharded.parameters()), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights, state = full_model_state(sharded), full_state(optimizer.state_dict())
    # the gpt2 block's head is tied, and saved as one tensor, as one process saves it
    assert {block!r} == "modern" or weights["lm_head.weight"] is weights["transformer.wte.weight"]
    if runtime.rank != 0:
        return None
    reference = optimizer_of(single)
    params = list(single.parameters())
    for step in steps:
        accumulated = None
        for micro_step in range(2):
            per_rank = []
            for inputs, targets in step[2 * micro_step: 2 * micro_step + 2]:
                single.zero_grad(set_to_none=True)
                (single(inputs, targets)[1] / 2).backward()
                per_rank.append([p.grad.clone() for p in params])
            mean = [(a + b) / 2 for a, b in zip(*per_rank)]
            accumulated = mean if accumulated is None else [total + g for total, g in zip(accumulated, mean)]
        for p, g in zip(params, accumulated):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        reference.step()
        reference.zero_grad(set_to_none=True)
    pairs = [*zip(tensors(weights), tensors(single.state_dict())),
             *zip(tensors(state), tensors(reference.state_dict()))]
    assert all(a.shape == b.shape for a, b in pairs) and len(pairs) == len(tensors(single.state_dict())) + \\
        len(tensors(reference.state_dict()))
    moved = max((a - b).abs().max().item() for a, b in zip(weights.values(), model_before.values()))
    return {{"weights": max((a - b).abs().max().item() for a, b in pairs[:len(weights)]),
            "optimizer": max((a.float() - b.float()).abs().max().item() for a, b in pairs[len(weights):]),
            "moved": moved}}


outcomes = {{name: case(max_norm) for name, max_norm in (("unclipped", math.inf), ("clipped", 0.05))}}
if runtime.rank == 0:
    with open({result!r}, "w") as file:
        json.dump(outcomes, file)
leave(None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("block, optimizer", [("gpt2", "adamw"), ("modern", "muon")])
def test_fsdp_steps_equal_one_process_on_the_same_global_batch(block, optimizer, tmp_path):
    # one launch per block, both cases in it: without clipping bit for bit; clipped, the two
    # processes sum the squares of their rows in another order than one process does
    script, result = tmp_path / "fsdp.py", tmp_path / "result.json"
    script.write_text(FSDP_SCRIPT.format(root=str(ROOT), result=str(result), block=block, optimizer=optimizer))
    finished = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert finished.returncode == 0, finished.stderr
    for case, tolerance in (("unclipped", 0), ("clipped", 1e-5)):
        outcome = json.loads(result.read_text())[case]
        assert outcome["moved"] > 1e-3
        assert outcome["weights"] <= tolerance * outcome["moved"] and outcome["optimizer"] <= tolerance, case


def tensors_of(state):
    """Every tensor in a (nested) state dict, in order."""
    items = state.values() if isinstance(state, dict) else state
    return [leaf for item in items
            for leaf in (tensors_of(item) if isinstance(item, (dict, list)) else [item]) if torch.is_tensor(leaf)]


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True], ids=["whole", "sharded"])
def test_an_fsdp_checkpoint_samples_and_resumes_exactly(sharded, tiny_dataset, tiny_chat_dataset, tmp_path):
    # one uninterrupted run saves at iterations 3 and 6; a folder holding only what it had
    # written when it saved at 3 resumes from there and must end where it ended, bit for bit;
    # the sharded case on a chat dataset
    flags = [f"--dataset={tiny_chat_dataset if sharded else tiny_dataset}", "--parallelism=fsdp",
             "--gradient_accumulation_steps=4", "--dropout=0.1", "--max_iters=6", "--eval_interval=3",
             "--sample_every_eval=false", *MODERN_RECIPE,
             f"--sharded_checkpoint={sharded}"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    finished = run_train(*flags, f"--out_dir={whole}", torchrun=True)
    assert finished.returncode == 0, finished.stderr
    as_killed_after_iteration_3(whole, resumed)
    finished = run_train(*flags, f"--out_dir={resumed}", "--init_from=resume", torchrun=True)
    assert finished.returncode == 0, finished.stderr
    assert "at iteration 3, exactly" in finished.stdout

    name = "ckpt_0000006" + (".dcp" if sharded else ".pt")
    assert (whole / name).is_dir() == sharded
    ends = [load_checkpoint_file(folder / name) for folder in (whole, resumed)]  # the resumed run's own save
    assert [(line["loss"], line["grad_norm"]) for line in train_lines(resumed)] == \
        [(line["loss"], line["grad_norm"]) for line in train_lines(whole)]
    for key in ("model", "optimizer"):
        assert all(torch.equal(a, b) for a, b in zip(tensors_of(ends[0][key]), tensors_of(ends[1][key])))
    # the format of one process: whole tensors, the optimizer keyed as torch keys it
    checkpoint = ends[0]
    assert not any(type(tensor) is not torch.Tensor for tensor in tensors_of(checkpoint))
    assert sorted(checkpoint["optimizer"]) == ["adamw", "muon"]
    muon_state = checkpoint["optimizer"]["muon"]["state"]
    assert sorted(muon_state) == list(range(len(muon_state)))
    sampled = run_sample(f"--out_dir={whole}", "--ckpt=latest", "--max_new_tokens=8", "--device=cpu")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.strip()
    if sharded:  # written by 2 processes, resumed by 1
        one = tmp_path / "one"
        as_killed_after_iteration_3(whole, one)
        finished = run_train(*flags, f"--out_dir={one}", "--init_from=resume")
        assert finished.returncode == 0, finished.stderr
        assert "at iteration 3, with fresh random streams (saved by 2 processes, resumed by 1)" in finished.stdout
        assert [line["iter"] for line in train_lines(one)] == list(range(1, 7))
        assert load_checkpoint_file(one / name)["iter_num"] == 6


def as_killed_after_iteration_3(out_dir, copy):
    """A folder holding only what out_dir's run had written when it was killed right after
    saving iteration 3: that checkpoint and its record, the tokenizer, the metrics so far."""
    copy.mkdir()
    [record] = [entry for entry in json.loads((out_dir / MANIFEST_FILE).read_text())["checkpoints"]
                if entry["iter"] == 3]
    (copy / MANIFEST_FILE).write_text(json.dumps({"checkpoints": [record]}))
    saved = out_dir / record["file"]
    (shutil.copytree if saved.is_dir() else shutil.copy2)(saved, copy / record["file"])
    shutil.copy2(out_dir / "tokenizer.tiktoken", copy / "tokenizer.tiktoken")
    lines = [line for line in read_metrics(out_dir) if line["iter"] <= 3]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
