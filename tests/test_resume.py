"""Stopping and resuming: a resumed run is the same run, bit for bit; SIGTERM and SIGINT
save and exit cleanly; kill -9 at any moment leaves a checkpoint to resume from."""
import json
import re
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import (ONE_THREAD, RECIPES, ROOT, TINY_MODEL, assert_same, read_metrics, run_train,
                     stop_during_iteration, train_lines, trained_iterations, wait_until, without_timings)
from owngpt import checkpoint

@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
@pytest.mark.parametrize("data", ["text", "chat"])
def test_resume_continues_exactly_as_if_never_stopped(data, recipe, tiny_dataset, tiny_chat_dataset, tmp_path,
                                                      train_here, monkeypatch):
    # dropout and gradient accumulation: the resumed run must redraw the same batches and masks.
    # Both runs plan 8 iterations (wsd's cooldown is placed by max_iters); SIGTERM stops one at 4
    flags = [f"--dataset={tiny_chat_dataset if data == 'chat' else tiny_dataset}", "--dropout=0.2", "--gradient_accumulation_steps=2", "--eval_interval=4",
             "--max_iters=8", *recipe]
    assert train_here(*flags, f"--out_dir={tmp_path / 'whole'}").returncode == 0
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 4)
        stopped = train_here(*flags, f"--out_dir={tmp_path / 'halves'}")
    assert stopped.returncode == 0 and "stopped at iteration 4:" in stopped.stdout
    resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}", "--init_from=resume")
    assert f"resuming from {tmp_path / 'halves' / 'ckpt_0000004.pt'} at iteration 4, exactly" in resumed.stdout

    whole, halves = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "halves")
    # train lines, and an eval and a sample line at 0, 4 and 8: the resumed run's sample at 8 is the same text
    assert [line["iter"] for line in halves] == [0, 0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 8]
    assert without_timings(halves) == without_timings(whole)
    one_go = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    two_goes = torch.load(tmp_path / "halves" / "ckpt.pt", weights_only=True)
    for key in ("model", "optimizer"):  # Muon's momentum and AdamW's moments, and each group's rate
        assert_same(one_go[key], two_goes[key], key)
    assert torch.equal(one_go["rng"][0]["loader"], two_goes["rng"][0]["loader"])


def start_train(*flags, cwd, log):
    """train.py in the background, its output going to the file `log`."""
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY_MODEL, *flags], cwd=cwd,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ONE_THREAD)


@pytest.mark.slow
def test_sigterm_and_sigint_finish_the_step_save_and_exit_zero_and_resume_neither_loses_nor_repeats(tiny_dataset, tmp_path):
    flags = [f"--dataset={tiny_dataset}", "--out_dir=out", "--eval_interval=1000", "--max_iters=100000"]
    out_dir = tmp_path / "out"
    stopped_at = []
    for signal_number, init_from in ((signal.SIGTERM, "scratch"), (signal.SIGINT, "resume")):
        log = tmp_path / f"{signal_number.name}.log"
        process = start_train(*flags, f"--init_from={init_from}", cwd=tmp_path, log=log)
        already = stopped_at[-1] if stopped_at else 0
        wait_until(lambda: trained_iterations(out_dir) >= already + 3)
        process.send_signal(signal_number)
        assert process.wait(timeout=60) == 0, log.read_text()
        iteration = int(re.search(r"stopped at iteration (\d+):", log.read_text())[1])
        assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == iteration
        stopped_at.append(iteration)
        assert [line["iter"] for line in train_lines(out_dir)] == list(range(1, iteration + 1))


@pytest.mark.slow
def test_kill_9_at_any_moment_even_inside_a_save_leaves_a_resumable_checkpoint(tiny_dataset, tmp_path):
    # a checkpoint every iteration, from a model big enough (~5 MB checkpoints) that a save takes a while
    flags = [f"--dataset={tiny_dataset}", "--out_dir=out", "--eval_interval=1", "--eval_iters=1", "--n_embd=128",
             "--n_head=4"]
    out_dir, moments = tmp_path / "out", random.Random(0)
    resumed_at, kills_inside_a_save = [0], 0
    for attempt in range(5):
        if kills_inside_a_save:
            break
        log = tmp_path / f"attempt{attempt}.log"
        process = start_train(*flags, "--max_iters=100000", f"--init_from={'resume' if attempt else 'scratch'}",
                              cwd=tmp_path, log=log)
        # the first iteration past the checkpoint is done and its evaluation (then save) begun
        wait_until(lambda: f"eval at iter {resumed_at[-1] + 1}:" in log.read_text())
        if attempt:  # the moment a checkpoint's temporary file appears
            wait_until(lambda: any(out_dir.glob(".ckpt_*.tmp")), interval=0)
        else:
            time.sleep(moments.uniform(0, 0.5))
        process.kill()
        process.wait()
        kills_inside_a_save += any(out_dir.glob(".ckpt_*.tmp"))  # a killed save leaves its temporary file
        path, saved = checkpoint.newest_valid_checkpoint(out_dir)
        assert saved["iter_num"] >= resumed_at[-1]
        resumed_at.append(saved["iter_num"])
    assert kills_inside_a_save
    finished = run_train(*flags, f"--max_iters={resumed_at[-1] + 2}", "--init_from=resume", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert f"at iteration {resumed_at[-1]}, exactly" in finished.stdout
    assert [line["iter"] for line in train_lines(out_dir)] == list(range(1, resumed_at[-1] + 3))
    assert json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"][-1]["iter"] == resumed_at[-1] + 2
    assert not list(out_dir.glob(".*.tmp"))  # what the killed saves left behind was cleared


@pytest.mark.slow
def test_a_second_run_on_a_busy_out_dir_is_refused_naming_the_first_and_accepted_once_it_was_killed(tiny_dataset,
                                                                                                     tmp_path):
    flags = [f"--dataset={tiny_dataset}", "--out_dir=out", "--eval_interval=100000"]
    log = tmp_path / "first.log"
    first = start_train(*flags, "--max_iters=100000", cwd=tmp_path, log=log)
    try:
        wait_until(lambda: "iter 1/" in log.read_text())  # training: it holds out_dir
        second = run_train(*flags, "--max_iters=2", cwd=tmp_path)
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert "out is in use by another run, process " + str(first.pid) in second.stderr
    finally:
        first.kill()  # SIGKILL: nothing of the run's own releases the folder, the kernel does
        first.wait()
    third = run_train(*flags, "--max_iters=2", cwd=tmp_path)  # the killed run saved no checkpoint
    assert third.returncode == 0, third.stderr
    assert [line["iter"] for line in train_lines(tmp_path / "out")] == [1, 2]
