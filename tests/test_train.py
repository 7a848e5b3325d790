"""train.py: config checking, a real training run end to end, its checkpoints, metrics,
the data checks, and the non-finite step guard. Training runs are real subprocesses on the
tiny dataset with a tiny model."""
import copy
import importlib.util
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import (BYTE_TOKENIZER, GPT2_RECIPE, MODERN_RECIPE, RECIPES, ROOT, TINY_MODEL, SimulatedClock,
                     eval_lines, read_metrics, run_train, simulate_machine, stop_during_iteration, train_lines)
from model import GPT, GPTConfig
from owngpt import checkpoint, dataset, flags, optimizers, runlog, tokenizer
from owngpt.optimizers import build_optimizer
import train


# ----------------------------------------------------------------------------- config
def test_unknown_flag_suggests_the_closest_key():
    with pytest.raises(flags.UserError, match=r"unknown flag --bach_size; did you mean 'batch_size'"):
        train.read_config(["--bach_size=4"])


def test_unknown_key_in_a_config_file_names_the_file_and_the_closest_key(tmp_path):
    config_file = tmp_path / "typo.py"
    config_file.write_text("import math\nlearning_rat = math.sqrt(1e-6)\n")
    with pytest.raises(flags.UserError, match=r"typo.py: unknown key 'learning_rat'; did you mean 'learning_rate'"):
        train.read_config([str(config_file)])


def test_wrong_type_is_rejected_naming_the_expected_type(tmp_path):
    with pytest.raises(flags.UserError, match=r"--max_iters=many: expected an integer, like the default 5000"):
        train.read_config(["--max_iters=many"])
    with pytest.raises(flags.UserError, match=r"--batch_size=1.5: expected an integer, like the default 32"):
        train.read_config(["--batch_size=1.5"])
    with pytest.raises(flags.UserError, match=r"--compile=maybe: expected true or false"):
        train.read_config(["--compile=maybe"])
    config_file = tmp_path / "typed.py"
    config_file.write_text("compile = 1\n")
    with pytest.raises(flags.UserError, match=r"typed.py: compile expects bool, got int 1"):
        train.read_config([str(config_file)])


def test_an_int_is_accepted_where_a_float_is_expected_and_1e4_where_an_int_is():
    assert train.read_config(["--learning_rate=1"]).learning_rate == 1.0
    assert train.read_config(["--max_iters=1e4"]).max_iters == 10_000


def test_config_files_run_in_order_then_flags_override_them(tmp_path):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("max_iters = 100\nbatch_size = 4\n")
    second.write_text("max_iters = 2 * max_iters  # later files see earlier values\n")
    cfg = train.read_config([str(first), str(second), "--batch_size=7", "--out_dir=out/x"])
    assert (cfg.max_iters, cfg.batch_size, cfg.out_dir) == (200, 7, "out/x")


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    for key, value in train.DEFAULTS.items():
        value = ",".join(value) if isinstance(value, tuple) else value  # a tuple as a flag writes it
        assert f"--{key}={value}\n      {train.HELP[key]}\n" in text + "\n"
    assert "--gradient_accumulation_steps=1\n      micro-steps per iteration" in text


def test_wandb_log_without_wandb_installed_is_a_clear_error(tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = train.read_config(["--wandb_log=True", f"--out_dir={tmp_path}"])
    runtime = SimpleNamespace(is_main=True)
    with pytest.raises(flags.UserError, match=r"wandb_log=True needs the wandb package: pip install wandb"):
        train.RunLog(cfg, runtime, resumed_at=None)


def test_a_config_error_exits_nonzero_with_the_message(train_here):
    finished = train_here("--dropuot=0.1")
    assert finished.returncode != 0
    assert "did you mean 'dropout'" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_the_modern_block_with_an_odd_head_size_is_refused_naming_n_embd_over_n_head(train_here):
    finished = train_here("--block=modern", "--n_embd=30", "--n_head=2")
    assert finished.returncode == 1
    assert "block=modern rotates pairs of channels: n_embd / n_head = 15 must be even" in finished.stderr
    assert "Traceback" not in finished.stderr


# ----------------------------------------------------------------------------- data checks
def test_missing_dataset_folder_is_a_clear_error(tmp_path):
    with pytest.raises(dataset.DatasetError, match=r"dataset folder .*nowhere does not exist.*prepare.py"):
        dataset.open_folder(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(dataset.DatasetError, match=r"empty has no meta.json"):
        dataset.open_folder(str(tmp_path / "empty"))


def test_block_size_longer_than_the_val_split_is_a_clear_error(tiny_dataset):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    block_size = meta["splits"]["val"]["tokens"] + 10
    with pytest.raises(dataset.DatasetError, match=rf"block_size={block_size} needs shards of at least"):
        dataset.load_windows(tiny_dataset, meta, "val", block_size)


def test_token_id_beyond_the_vocabulary_is_found_before_training(tiny_dataset):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 100  # the shards hold byte values and end-of-text above it
    with pytest.raises(dataset.DatasetError, match=r"train_000000.bin holds token id \d+, but the tokenizer has only 100 ids"):
        dataset.load_windows(tiny_dataset, meta, "train", 32)


def test_meta_json_disagreeing_with_the_shards_is_refused(tiny_dataset):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] += 1
    with pytest.raises(dataset.DatasetError, match=r"meta.json says the train split has [\d,]+ tokens, its shards hold"):
        dataset.load_windows(tiny_dataset, meta, "train", 32)


def test_windows_start_at_every_token_of_a_shard_that_leaves_room_for_a_whole_window():
    # shards of 10 and 6 tokens, windows of block_size + 1 = 5 tokens: 6 in the first, 2 in the second
    shards = [np.arange(10, dtype=np.uint16), np.arange(100, 106, dtype=np.uint16)]
    windows = dataset.TokenWindows(shards, block_size=4)
    assert windows.count == 8
    starts = [*range(0, 6), 100, 101]
    assert windows.rows(np.arange(8)).tolist() == [list(range(start, start + 5)) for start in starts]


def test_fixed_eval_batches_are_the_same_every_time_and_random_ones_follow_the_seed(tiny_dataset):
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    windows = dataset.load_windows(tiny_dataset, meta, "train", 32)
    first, second = windows.fixed_batch_ids(3, 4), windows.fixed_batch_ids(3, 4)
    assert all((a == b).all() for a, b in zip(first, second))
    cpu = torch.device("cpu")
    draw = lambda seed: train.batch(windows, torch.randint(windows.count, (4,), generator=torch.Generator().manual_seed(seed)).numpy(), cpu)
    (x1, y1), (x2, _), (x3, _) = draw(1), draw(1), draw(2)
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory):
    """30 iterations, evaluated and saved every 10: checkpoints at 20 and 30 kept."""
    work = tmp_path_factory.mktemp("run")
    finished = run_train(f"--dataset={tiny_dataset}", "--out_dir=out", "--max_iters=30", "--eval_interval=10",
                         "--dropout=0.1", cwd=work)
    assert finished.returncode == 0, finished.stderr
    return work / "out", tiny_dataset, finished.stdout


@pytest.mark.parametrize("name, recipe", RECIPES.items(), ids=RECIPES.keys())
def test_each_recipe_trains_the_block_optimizer_and_schedule_its_name_says(name, recipe, train_here, tiny_dataset,
                                                                            tmp_path):
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=1", "--eval_interval=1",
                          "--sample_every_eval=False", *recipe)
    assert finished.returncode == 0, finished.stderr
    block, optimizer, lr_schedule = name.split("_")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["model_config"]["block"] == block
    assert (saved["config"]["optimizer"], saved["config"]["lr_schedule"]) == (optimizer, lr_schedule)
    # the optimizer that stepped: Muon with AdamW saves each part under its name, AdamW alone its own state
    assert sorted(saved["optimizer"]) == {"muon": ["adamw", "muon"], "adamw": ["param_groups", "state"]}[optimizer]


def test_training_brings_val_loss_below_its_start(trained_run):
    out_dir = trained_run[0]
    evals = eval_lines(out_dir)
    assert [line["iter"] for line in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5


def test_run_prints_its_plan_evaluations_and_summary(trained_run):
    _, _, stdout = trained_run
    assert "tokens per parameter (Chinchilla-optimal: ~20)" in stdout
    assert "estimated wall time of the whole run" in stdout
    assert "bits/byte" in stdout and "gap" in stdout
    assert "done: iteration 30" in stdout and "peak memory" in stdout


def test_metrics_lines_carry_iteration_time_and_the_documented_fields(trained_run):
    out_dir = trained_run[0]
    lines = read_metrics(out_dir)
    assert all("iter" in line and "elapsed_s" in line for line in lines)
    assert [line["iter"] for line in train_lines(out_dir)] == list(range(1, 31))
    assert all({"loss", "lr", "tokens_per_s"} <= line.keys() for line in train_lines(out_dir))
    for line in eval_lines(out_dir):
        assert {"val_loss", "val_ppl", "val_acc", "val_bpb", "train_loss"} <= line.keys()
        assert line["val_ppl"] == pytest.approx(torch.tensor(line["val_loss"]).exp().item(), rel=1e-5)
    # bits per byte: the val loss in bits over the bytes of text its fixed batches predict
    tiny_dataset = trained_run[1]
    windows = dataset.load_windows(tiny_dataset, dataset.read_meta(tiny_dataset), "val", block_size=32)
    targets = windows.rows(np.concatenate(windows.fixed_batch_ids(2, 8)))[:, 1:]  # TINY_MODEL's eval batches
    encoding = tokenizer.load_tokenizer(tiny_dataset)
    text_bytes = sum(len(encoding.decode_single_token_bytes(token)) for token in targets.flat
                     if token != encoding.eot_token)
    for line in eval_lines(out_dir):
        expected = line["val_loss"] * targets.size / math.log(2) / text_bytes
        assert line["val_bpb"] == pytest.approx(expected, rel=1e-9)


def test_bits_per_byte_are_the_val_loss_in_bits_over_the_bytes_of_text_predicted(one_thread):
    # A modern-block GPT starts with a zero head: every logit is 0, each of the byte tokenizer's
    # 257 tokens as likely, so each target costs ln 257 nats. The window's 8 targets hold 7 bytes
    # of text and an end-of-text, a boundary between documents that is no text. A model whose
    # logits are all equal predicts token 0 (argmax takes the first), the NUL byte: 1 target of 8.
    encoding = tokenizer.load_tokenizer(None, BYTE_TOKENIZER)
    eot = encoding.eot_token
    windows = dataset.TokenWindows([np.array([eot, *b"hi", eot, *b"abcd", 0], dtype=np.uint16)], block_size=8)
    model = GPT(GPTConfig(vocab_size=257, block_size=8, n_layer=1, n_head=2, n_embd=16, block="modern"))
    runtime = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), autocast=nullcontext())
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths(encoding))
    measured = train.evaluate(model, windows, windows.fixed_batch_ids(1, 1), byte_lengths, runtime)
    assert measured["loss"] == pytest.approx(math.log(257), rel=1e-6)
    assert measured["bpb"] == pytest.approx(8 * math.log2(257) / 7, rel=1e-6)
    assert measured["acc"] == 1 / 8


def test_checkpoints_load_with_weights_only_into_a_fresh_model(trained_run):
    out_dir = trained_run[0]
    for name in ("ckpt.pt", "best.pt"):
        checkpoint = torch.load(out_dir / name, weights_only=True)
        assert not any(key.startswith(("_orig_mod.", "module.")) for key in checkpoint["model"])
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        assert checkpoint["tokenizer"]["vocab_size"] == checkpoint["model_config"]["vocab_size"]
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 30


def test_the_trained_tokenizer_is_copied_so_the_out_dir_stands_alone(trained_run):
    out_dir, dataset, _ = trained_run
    checkpoint = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert (out_dir / "tokenizer.tiktoken").read_bytes() == (dataset / "tokenizer.tiktoken").read_bytes()
    encoding = tokenizer.load_tokenizer(out_dir, checkpoint["tokenizer"])  # as sample.py does
    assert encoding.decode(encoding.encode("Kalo mi ne.")) == "Kalo mi ne."


def test_keep_last_checkpoints_are_recorded_with_size_and_sha256(trained_run):
    out_dir = trained_run[0]
    entries = json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"]
    assert [entry["iter"] for entry in entries] == [20, 30]
    assert sorted(path.name for path in out_dir.glob("ckpt_*.pt")) == ["ckpt_0000020.pt", "ckpt_0000030.pt"]
    for entry in entries:
        assert checkpoint.checkpoint_problem(out_dir / entry["file"], entry) is None
    assert (out_dir / "ckpt.pt").samefile(out_dir / "ckpt_0000030.pt")


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(trained_run, tmp_path, capsys, damage):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    newest = out_dir / "ckpt_0000030.pt"
    data = bytearray(newest.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(data)
    elif damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    else:
        newest.unlink()
    path, saved = checkpoint.newest_valid_checkpoint(out_dir)
    assert path.name == "ckpt_0000020.pt" and saved["iter_num"] == 20
    assert "skipping damaged checkpoint" in capsys.readouterr().err


def test_resume_after_a_damaged_checkpoint_continues_from_the_previous_and_forgets_the_newer_ones(
        trained_run, tiny_dataset, tmp_path, train_here):
    # the newest (30) is damaged: the run goes back to 20 and saves 25, a run of its own from 20 on
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    newest = out_dir / "ckpt_0000030.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=25", "--eval_interval=10",
                          "--dropout=0.1", "--init_from=resume")
    assert finished.returncode == 0, finished.stderr
    assert "skipping damaged checkpoint" in finished.stderr
    assert f"resuming from {out_dir / 'ckpt_0000020.pt'} at iteration 20" in finished.stdout
    assert [line["iter"] for line in train_lines(out_dir)] == list(range(1, 26))
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 25
    entries = json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"]
    assert [entry["iter"] for entry in entries] == [20, 25]
    assert sorted(path.name for path in out_dir.glob("ckpt_*.pt")) == ["ckpt_0000020.pt", "ckpt_0000025.pt"]


def test_eval_only_evaluates_a_checkpoint_and_writes_nothing(trained_run, tiny_dataset, train_here):
    before = {path.name: path.stat().st_mtime_ns for path in trained_run[0].iterdir()}
    finished = train_here(f"--dataset={tiny_dataset}", f"--init_from={trained_run[0] / 'best.pt'}", "--eval_only=True",
                          f"--out_dir={trained_run[0]}")
    assert finished.returncode == 0, finished.stderr
    val_loss = float(finished.stdout.split("val loss ")[1].split()[0])
    assert val_loss == pytest.approx(min(line["val_loss"] for line in eval_lines(trained_run[0])), abs=1e-3)
    assert {path.name: path.stat().st_mtime_ns for path in trained_run[0].iterdir()} == before


def test_init_from_a_checkpoint_file_starts_a_new_run_from_its_weights(trained_run, tiny_dataset, tmp_path, train_here):
    finished = train_here(f"--dataset={tiny_dataset}", f"--init_from={trained_run[0] / 'best.pt'}",
                          f"--out_dir={tmp_path / 'tuned'}", "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-4",
                          "--min_lr=1e-4")
    assert finished.returncode == 0, finished.stderr
    best_val_loss = min(line["val_loss"] for line in eval_lines(trained_run[0]))
    start = eval_lines(tmp_path / "tuned")[0]
    assert start["iter"] == 0 and start["val_loss"] == pytest.approx(best_val_loss, abs=1e-4)
    checkpoint = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 2  # its own iterations and optimizer, not the checkpoint's
    adamw = checkpoint["optimizer"].get("adamw", checkpoint["optimizer"])  # muon's checkpoints hold both parts
    assert {int(state["step"]) for state in adamw["state"].values()} == {2}


def test_a_new_run_refuses_an_out_dir_that_holds_a_run(trained_run, tiny_dataset):
    cfg = train.read_config([f"--out_dir={trained_run[0]}"])
    with pytest.raises(checkpoint.CheckpointError, match=r"already holds checkpoints of a run: continue it with init_from=resume"):
        checkpoint.prepare_out_dir(Path(cfg.out_dir), tiny_dataset, {"file": None}, resuming=False)


def test_resuming_with_another_architecture_names_the_field_and_both_values(trained_run, tiny_dataset):
    saved = torch.load(trained_run[0] / "ckpt.pt", weights_only=True)
    other = GPTConfig(**{**saved["model_config"], "n_layer": 3})
    with pytest.raises(checkpoint.CheckpointError, match=r"has n_layer=2 but the config says n_layer=3"):
        checkpoint.check_checkpoint_fits(saved, "ckpt.pt", other, saved["tokenizer"], tiny_dataset)
    trained = saved["model_config"]["block"]
    other = {"gpt2": "modern", "modern": "gpt2"}[trained]
    with pytest.raises(checkpoint.CheckpointError, match=rf"has block='{trained}' but the config says block='{other}'"):
        checkpoint.check_checkpoint_fits(saved, "ckpt.pt", GPTConfig(**{**saved["model_config"], "block": other}),
                                    saved["tokenizer"], tiny_dataset)
    tokenizer = {**saved["tokenizer"], "kind": "gpt2", "vocab_size": 50257}
    with pytest.raises(checkpoint.CheckpointError, match=r"different tokenizer .* kind is 'bpe' there and 'gpt2' here"):
        checkpoint.check_checkpoint_fits(saved, "ckpt.pt", GPTConfig(**saved["model_config"]), tokenizer, tiny_dataset)


def test_resuming_with_another_optimizer_is_refused_in_one_line_naming_both(trained_run, tiny_dataset, tmp_path,
                                                                           train_here):
    out_dir = tmp_path / "out"
    shutil.copytree(trained_run[0], out_dir)
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=40", "--dropout=0.1",
                          "--init_from=resume", "--optimizer=adamw")  # the fixture trained with muon, the default
    assert finished.returncode == 1
    message = finished.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert "was trained with optimizer=muon, this run asks for optimizer=adamw" in message
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 30  # nothing trained


# ----------------------------------------------------------------------------- learning rate schedule
def test_wsd_holds_the_peak_until_the_last_cooldown_fraction_then_decays_linearly_to_min_lr():
    cfg = train.read_config(["--lr_schedule=wsd", "--max_iters=100", "--warmup_iters=10", "--cooldown_fraction=0.4",
                             "--learning_rate=1e-3", "--min_lr=1e-4"])
    rates = [optimizers.learning_rate_at(iteration, cfg) for iteration in range(101)]
    assert all(earlier < later < 1e-3 for earlier, later in zip(rates[:9], rates[1:10]))  # warmup
    assert rates[10:61] == [1e-3] * 51  # held until the last 40% of 100 iterations
    assert rates[80] == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down, linearly
    assert all(earlier > later for earlier, later in zip(rates[60:100], rates[61:]))
    assert rates[100] == pytest.approx(1e-4)


def test_each_parameter_group_follows_the_schedule_from_its_own_peak(train_here, monkeypatch, tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *MODERN_RECIPE, "--muon_lr=0.05", "--embedding_lr=0.2",
             "--max_iters=5", "--eval_interval=1000"]
    real_optimizer_step, rates, momenta = train.optimizer_step, [], []

    def recording_optimizer_step(run, *args):
        rates.append([(group["lr_key"], group["lr"]) for group in run.optimizer.param_groups])
        momenta.append(run.optimizer.param_groups[0]["momentum"])
        return real_optimizer_step(run, *args)

    with monkeypatch.context() as patch:
        patch.setattr(train, "optimizer_step", recording_optimizer_step)
        assert train_here(*flags).returncode == 0
    cfg = train.read_config([*TINY_MODEL, *flags])
    factors = [optimizers.learning_rate_at(iteration, cfg) / cfg.learning_rate for iteration in range(5)]
    assert len(set(factors)) == 4  # two warmup steps, the peak, the cooldown
    for groups, factor in zip(rates, factors, strict=True):
        # Muon's hidden matrices, then AdamW's head, vectors (none in the modern block) and token embedding
        assert [key for key, _ in groups] == ["muon_lr", "learning_rate", "learning_rate", "embedding_lr"]
        assert [rate for _, rate in groups] == pytest.approx([0.05 * factor, 3e-3 * factor, 3e-3 * factor, 0.2 * factor],
                                                             rel=1e-12)
    # Muon's momentum warms up from 0.85 by 0.1 / 300 an iteration
    assert momenta == pytest.approx([0.85 + 0.1 * iteration / 300 for iteration in range(5)], rel=1e-12)
    assert optimizers.muon_momentum_at(300) == optimizers.muon_momentum_at(10_000) == 0.95


def test_a_modern_run_saved_before_embedding_lr_resumes_with_its_embedding_at_learning_rate(
        train_here, monkeypatch, tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *MODERN_RECIPE, "--value_embeddings=false",
             "--eval_interval=2"]  # such runs had no value embeddings either
    with monkeypatch.context() as patch:  # the optimizer as train.py built it before embedding_lr
        patch.setattr(train, "build_optimizer", lambda *args: build_optimizer(*args[:7]))
        assert train_here(*flags, "--max_iters=2").returncode == 0
    real_optimizer_step, groups = train.optimizer_step, []

    def recording_optimizer_step(run, *args):
        groups.append([group["lr_key"] for group in run.optimizer.param_groups])
        return real_optimizer_step(run, *args)

    monkeypatch.setattr(train, "optimizer_step", recording_optimizer_step)
    assert train_here(*flags, "--max_iters=4", "--init_from=resume").returncode == 0
    assert groups == [["muon_lr", "learning_rate", "learning_rate"]] * 2


# ----------------------------------------------------------------------------- max_time
def fitted_max_iters(stdout):
    found = re.findall(r"max_time=[\d.]+s: \d+ ms/iter and [\d.]+s per evaluation fit max_iters=(\d+)", stdout)
    return [int(value) for value in found]


def test_max_time_fits_max_iters_after_the_timed_iterations_and_the_run_ends_there(train_here, tiny_dataset,
                                                                                   tmp_path):
    # a budget spent before iteration 30 leaves room for one more iteration: the fit is 31 on any machine
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *MODERN_RECIPE, "--max_time=0.001",
             "--eval_interval=1000"]
    finished = train_here(*flags)
    assert finished.returncode == 0, finished.stderr
    assert fitted_max_iters(finished.stdout) == [31]
    assert "done: iteration 31 " in finished.stdout
    assert [line["iter"] for line in train_lines(tmp_path)] == list(range(1, 32))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["max_iters"] == 31
    # resumed past iteration 30 it keeps the fitted max_iters, whatever --max_iters says: it is done
    resumed = train_here(*flags, "--init_from=resume", "--max_iters=50")
    assert resumed.returncode == 0, resumed.stderr
    assert fitted_max_iters(resumed.stdout) == [] and "done: iteration 31 " in resumed.stdout


def test_a_max_time_run_resumed_past_the_timed_iterations_goes_on_to_the_same_max_iters(train_here, monkeypatch,
                                                                                         tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *MODERN_RECIPE, "--max_time=3600",
             "--eval_interval=1000"]
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 32)
        first = train_here(*flags)
    assert first.returncode == 0, first.stderr
    [fitted] = fitted_max_iters(first.stdout)
    assert fitted > 32  # an hour's budget
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 32 and saved["config"]["max_iters"] == fitted
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 1)
        resumed = train_here(*flags, "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert fitted_max_iters(resumed.stdout) == []  # no refit: its iterations are not timed from the start
    assert f"iter 33/{fitted}:" in resumed.stdout
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 33 and saved["config"]["max_iters"] == fitted


def test_a_max_time_run_resumed_inside_the_timed_iterations_times_the_rest_of_them(train_here, monkeypatch,
                                                                                  tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *MODERN_RECIPE, "--max_time=3600",
             "--eval_interval=1000"]
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 10)
        assert train_here(*flags).returncode == 0
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 21)  # iteration 31
        resumed = train_here(*flags, "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    [fitted] = fitted_max_iters(resumed.stdout)  # at iteration 30, from iterations 11 to 30
    assert f"iter 31/{fitted}:" in resumed.stdout
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert saved["iter_num"] == 31 and saved["config"]["max_iters"] == fitted


def test_each_log_line_gives_the_iterations_time_speed_and_the_time_left(train_here, monkeypatch, tiny_dataset,
                                                                         tmp_path):
    # every iteration takes 0.25 s of the simulated clock and the evaluations none: 8 x 32 tokens in 0.25 s
    with monkeypatch.context() as patch:
        simulate_machine(patch, SimulatedClock(), lambda iteration: 0.25)
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=3",
                              "--eval_interval=3", "--sample_every_eval=false")
    assert finished.returncode == 0, finished.stderr
    assert [(line["ms_per_iter"], line["tokens_per_s"]) for line in train_lines(tmp_path)] == [(250.0, 1024.0)] * 3
    assert "iter 1/3: loss" in finished.stdout and "| 250 ms/iter | 1,024 tokens/s | ETA 0.5s" in finished.stdout


def busy_then_quiet(iteration):
    return 0.5 if iteration <= 40 else 0.1  # a machine busy for its first 40 iterations


def test_under_wsd_a_run_slowed_for_its_first_iterations_still_spends_its_budget(train_here, monkeypatch,
                                                                                 tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", *MODERN_RECIPE, "--max_time=60", "--eval_interval=10000",
             "--log_interval=100", "--sample_every_eval=false"]
    with monkeypatch.context() as patch:
        simulate_machine(patch, SimulatedClock(), busy_then_quiet)
        finished = train_here(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert finished.returncode == 0, finished.stderr
    fits = fitted_max_iters(finished.stdout)
    assert fits[0] == 30 + int((60 - 30 * 0.5) / 0.5)  # from the busy iterations alone: 120, 28 s of 60
    assert len(fits) > 1 and f"done: iteration {fits[-1]} " in finished.stdout
    last = eval_lines(tmp_path / "whole")[-1]
    assert last["iter"] == fits[-1] and 0.95 * 60 <= last["elapsed_s"] <= 60
    # stopped in the cooldown and resumed, the run ends where the whole one did
    with monkeypatch.context() as patch:
        simulate_machine(patch, SimulatedClock(), busy_then_quiet)
        stop_during_iteration(patch, fits[-1] - 20)
        assert train_here(*flags, f"--out_dir={tmp_path / 'halves'}").returncode == 0
    with monkeypatch.context() as patch:
        simulate_machine(patch, SimulatedClock(), lambda iteration: 0.1)
        resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert fitted_max_iters(resumed.stdout) == [] and f"done: iteration {fits[-1]} " in resumed.stdout


def test_under_cosine_max_iters_is_fitted_once(train_here, monkeypatch, tiny_dataset, tmp_path):
    with monkeypatch.context() as patch:
        simulate_machine(patch, SimulatedClock(), busy_then_quiet)
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *GPT2_RECIPE, "--max_time=60",
                              "--eval_interval=10000", "--log_interval=100", "--sample_every_eval=false")
    assert finished.returncode == 0, finished.stderr
    assert fitted_max_iters(finished.stdout) == [120]  # every iteration's rate depends on it: no refit
    assert "done: iteration 120 " in finished.stdout


def test_max_time_leaves_room_for_the_evaluations_the_iterations_bring(train_here, monkeypatch, tiny_dataset,
                                                                        tmp_path):
    # each iteration takes 0.1 s and each evaluation 1 s (val, then train: 0.5 s each). At iteration
    # 30, 3 s of iterations and the evaluations at 0, 10 and 20 have taken 6 s: the 54.1 s left hold
    # 270 iterations of 0.1 s and a tenth of an evaluation each (not 541 of 0.1 s)
    clock, real_evaluate = SimulatedClock(), train.evaluate

    def evaluate(*args):
        clock.now += 0.5
        return real_evaluate(*args)

    with monkeypatch.context() as patch:
        simulate_machine(patch, clock, lambda iteration: 0.1)
        patch.setattr(train, "evaluate", evaluate)
        stop_during_iteration(patch, 31)  # the fit is made at iteration 30
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *GPT2_RECIPE, "--max_time=60.1",
                              "--eval_interval=10", "--sample_every_eval=false")
    assert finished.returncode == 0, finished.stderr
    assert "100 ms/iter and 1.0s per evaluation fit max_iters=300" in finished.stdout


# ----------------------------------------------------------------------------- accumulation and non-finite steps
def test_accumulated_micro_batches_give_the_loss_gradients_and_muon_step_of_the_whole_batch(one_thread):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=32, block="modern"))
    whole = copy.deepcopy(model)
    tokens = torch.randint(100, (6, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    halves = iter([(inputs[:3], targets[:3]), (inputs[3:], targets[3:])])
    losses, gradients = [], []
    for net, micro_steps, next_batch in ((model, 2, lambda: next(halves)), (whole, 1, lambda: (inputs, targets))):
        losses.append(train.forward_backward(net, next_batch, micro_steps, autocast=nullcontext(), scaler=None,
                                             is_ddp=False))
        gradients.append([p.grad.clone() for p in net.parameters()])
        build_optimizer(net, "muon", 1e-3, 0.02, 0.1, (0.9, 0.95), "cpu").step()
    # the micro-batches' mean, not their sum: Muon's and AdamW's steps would hardly tell, the clipping would
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for (name, _), micro, at_once in zip(model.named_parameters(), *gradients):
        torch.testing.assert_close(micro, at_once, rtol=0, atol=1e-7, msg=name)
    for (name, p), q in zip(model.named_parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def train_with_a_nan_step(train_here, monkeypatch, dataset, out_dir, *flags):
    """Iteration 3's loss is made NaN, in a run that saves every iteration: the loop's
    forward_backward is wrapped for this run only (its gradients stay finite, as when the loss
    alone overflows). Returns, per iteration, (skipped, weights changed, optimizer state changed)."""
    real_forward_backward, iterations = train.forward_backward, []
    real_optimizer_step, changes = train.optimizer_step, []

    def nan_at_iteration_3(*args, **kwargs):
        iterations.append(None)
        loss = real_forward_backward(*args, **kwargs)
        return loss * math.nan if len(iterations) == 3 else loss

    def watched_optimizer_step(run, *args):
        before = weights_and_optimizer_state(run)
        result = real_optimizer_step(run, *args)
        after = weights_and_optimizer_state(run)
        changes.append((result[2], *(not same_tensors(a, b) for a, b in zip(before, after))))
        return result

    with monkeypatch.context() as patch:
        patch.setattr(train, "forward_backward", nan_at_iteration_3)
        patch.setattr(train, "optimizer_step", watched_optimizer_step)
        finished = train_here(f"--dataset={dataset}", f"--out_dir={out_dir}", "--max_iters=5", "--eval_interval=1",
                              "--keep_last=10", *flags)
    assert finished.returncode == 0, finished.stderr
    return changes


def weights_and_optimizer_state(run):
    """Copies of the parameters, and of every tensor the optimizer keeps (AdamW's moments and
    step counts, Muon's momentum buffers)."""
    parts = getattr(run.optimizer, "parts", {"adamw": run.optimizer}).values()
    state = [value.clone() for part in parts for per_param in part.state.values() for value in per_param.values()]
    return [p.detach().clone() for p in run.raw_model.parameters()], state


def same_tensors(first, second):
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_a_non_finite_step_is_skipped_and_counted_leaving_the_optimizer_untouched(recipe, train_here, monkeypatch,
                                                                                   tiny_dataset, tmp_path):
    out_dir = tmp_path / "out"
    changes = train_with_a_nan_step(train_here, monkeypatch, tiny_dataset, out_dir, *recipe,
                                    "--gradient_accumulation_steps=2")
    lines = {line["iter"]: line for line in train_lines(out_dir)}
    assert lines[3]["skipped"] is True and lines[3]["loss"] is None
    assert not any(lines[i]["skipped"] for i in (1, 2, 4, 5))
    # the skipped step leaves the weights, Muon's momentum and AdamW's moments as they were
    assert changes == [(False, True, True)] * 2 + [(True, False, False)] + [(False, True, True)] * 2
    # AdamW counts the steps it took: iteration 3 is not among them
    def steps(name):
        saved = torch.load(out_dir / name, weights_only=True)["optimizer"]
        adamw = saved.get("adamw", saved)  # Muon with AdamW saves each part under its name
        return {int(state["step"]) for state in adamw["state"].values()}

    assert steps("ckpt_0000002.pt") == {2} and steps("ckpt_0000005.pt") == {4}
    assert not (out_dir / "ckpt_0000003.pt").exists()  # nothing saved while steps are failing


def test_repeated_non_finite_steps_stop_the_run_naming_the_iteration_and_save_nothing_new(train_here, monkeypatch,
                                                                                         tiny_dataset, tmp_path):
    out_dir = tmp_path / "out"
    train_with_a_nan_step(train_here, monkeypatch, tiny_dataset, out_dir)
    # a learning rate of 1e30 is a real divergence: one step sends the weights to ~1e30, then every loss is NaN
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=20", "--eval_interval=1",
                          "--keep_last=10", "--init_from=resume", "--learning_rate=1e30", "--warmup_iters=0",
                          "--max_bad_steps=3")
    assert finished.returncode == 1
    assert "stopping at iteration 9: 3 steps in a row had a loss or gradient that is not finite (the first at iteration 7)" in finished.stderr
    saved = [entry["iter"] for entry in json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"]]
    assert max(saved) == 6
    assert [line["skipped"] for line in train_lines(out_dir)][-3:] == [True] * 3


# ----------------------------------------------------------------------------- samples
def test_each_evaluation_prints_and_records_a_sample_of_the_text(trained_run):
    out_dir, _, stdout = trained_run
    samples = [line for line in read_metrics(out_dir) if "sample" in line]
    assert [line["iter"] for line in samples] == [0, 10, 20, 30]
    assert all(isinstance(line["sample"], str) and line["sample_s"] >= 0 for line in samples)
    assert any(char.isalpha() for char in samples[-1]["sample"])
    printed = stdout.splitlines()
    for line in samples:  # one line each, right after its evaluation's line
        shown = f'sample at iter {line["iter"]}: "{runlog.one_line(line["sample"])}"'
        at = next(index for index, text in enumerate(printed) if text.startswith(shown))
        assert printed[at - 1].startswith(f"eval at iter {line['iter']}:")


def test_samples_leave_the_training_exactly_as_without_them(trained_run, tiny_dataset, tmp_path, train_here):
    # trained_run samples (the default); this run, the same in every other key, does not.
    # With dropout, a sample that drew from the global random state would change every mask after it
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=30",
                          "--eval_interval=10", "--dropout=0.1", "--sample_every_eval=False")
    assert finished.returncode == 0, finished.stderr
    assert "sample at iter" not in finished.stdout
    losses = lambda out_dir: [(line["iter"], line.get("loss"), line.get("val_loss"), line.get("train_loss"))
                              for line in read_metrics(out_dir) if "sample" not in line]
    assert losses(tmp_path) == losses(trained_run[0])
    with_samples = torch.load(trained_run[0] / "ckpt.pt", weights_only=True)
    without = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for name, tensor in with_samples["model"].items():
        assert torch.equal(tensor, without["model"][name]), name
    for key in ("torch", "loader"):
        assert torch.equal(with_samples["rng"][0][key], without["rng"][0][key]), key
    assert with_samples["rng"][0]["python"] == without["rng"][0]["python"]
    assert with_samples["rng"][0]["numpy"] == without["rng"][0]["numpy"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_on_cpu_a_freed_large_tensor_comes_back_without_the_kernel_faulting_its_pages_in_again():
    # Each step's logits are tens of MiB; glibc would unmap them when freed and the kernel
    # fault in and zero every page of the next step's. Counted in page faults, not time.
    # With the heap kept, a freed tensor's chunk can still lose a few bytes to a small
    # allocation made before the next tensor, which then no longer fits and grows the heap;
    # how many rounds that takes varies from process to process (1 to 6 in 80 processes),
    # after which two chunks take turns. So: 24 rounds, and the last 8 must reuse memory.
    code = textwrap.dedent("""
        import resource, torch
        import train  # as train.py runs it: after its imports, whose allocations shape the heap
        from owngpt.runtime import keep_freed_memory
        def faults_of_one_128_mib_tensor():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.ones(4096, 8192)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        default = [faults_of_one_128_mib_tensor() for _ in range(4)]
        assert keep_freed_memory()
        kept = [faults_of_one_128_mib_tensor() for _ in range(24)]
        print(*default[-2:], *kept[-8:])
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    faults = list(map(int, done.stdout.split()))
    pages = 4096 * 8192 * 4 // resource.getpagesize()
    assert max(faults[2:]) < pages // 100, faults
    assert min(faults[:2]) > 10 * max(faults[2:]), faults


def test_under_wsd_lr_decay_iters_ends_the_cooldown_so_a_run_stopped_early_and_continued_is_one_run():
    planned = ["--lr_schedule=wsd", "--warmup_iters=10", "--cooldown_fraction=0.4", "--learning_rate=1e-3",
               "--min_lr=1e-4", "--lr_decay_iters=100"]
    whole = train.read_config([*planned, "--max_iters=100"])
    first_part = train.read_config([*planned, "--max_iters=70"])  # stopped early, then continued to 100
    assert [optimizers.learning_rate_at(i, first_part) for i in range(70)] == \
        [optimizers.learning_rate_at(i, whole) for i in range(70)]
    assert optimizers.learning_rate_at(60, first_part) == 1e-3 and optimizers.learning_rate_at(69, first_part) < 1e-3
    assert optimizers.learning_rate_at(100, whole) == optimizers.learning_rate_at(120, whole) == 1e-4
