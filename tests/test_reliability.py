"""Faults and bad input, each tried for real: a rank killed under torchrun --max-restarts,
a full disk and a read-only disk (small tmpfs mounts), an out_dir that is a file, damaged
and mismatched datasets, mismatched checkpoints, pickles that carry code, and downloads
that try to leave the dataset folder. Every case must end in a clear message naming the
file, key or value, a non-zero exit, and nothing already written damaged."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from test_resume import trained_iterations, wait_until
from test_train import ONE_THREAD, ROOT, TINY_MODEL, read_metrics, train_lines


# ----------------------------------------------------------------------------- restarts
def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def worker_pid(torchrun_pid, rank):
    """The pid of the child of torchrun's agent that runs the given rank (read from /proc)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()[1])
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue  # the process ended meanwhile
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def lines_so_far(out_dir):
    """metrics.jsonl as it is now, without a last line still being written."""
    lines = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's worker processes in /proc")
def test_a_rank_killed_mid_run_makes_torchrun_restart_the_group_which_resumes_from_its_last_checkpoint(tiny_dataset, tmp_path):
    # a static rendezvous on a free port: torchrun's agent stays up and restarts its two workers
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0", "--nproc-per-node=2",
                "--max-restarts=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    flags = [*TINY_MODEL, f"--dataset={tiny_dataset}", "--out_dir=out", "--gradient_accumulation_steps=2",
             "--eval_interval=4", "--max_iters=24"]
    out_dir, log = tmp_path / "out", tmp_path / "torchrun.log"
    group = subprocess.Popen([*torchrun, str(ROOT / "train.py"), *flags], cwd=tmp_path, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env=ONE_THREAD)
    try:
        wait_until(lambda: (out_dir / "metrics.jsonl").exists() and trained_iterations(out_dir) >= 6, timeout=120)
        rank_1 = worker_pid(group.pid, rank=1)
        # SIGSTOP first: rank 0 then waits for rank 1 at the next all-reduce, so the record
        # read below is the whole record of the first attempt; then the crash itself
        os.kill(rank_1, signal.SIGSTOP)
        time.sleep(1)
        before_crash = lines_so_far(out_dir)
        checkpoint_iter = json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"][-1]["iter"]
        os.kill(rank_1, signal.SIGKILL)
        assert group.wait(timeout=180) == 0, log.read_text()
    finally:
        group.kill()
    text = log.read_text()
    assert "exitcode: -9" in text and "local_rank: 1" in text  # the crash torchrun saw
    assert "torchrun restart 1: continuing from the newest valid checkpoint in out" in text
    assert f"resuming from out/ckpt_{checkpoint_iter:07d}.pt at iteration {checkpoint_iter}, exactly" in text

    # the first attempt had gone past its last checkpoint: those iterations are redone
    done_before = [line["iter"] for line in before_crash if "loss" in line]
    assert done_before == list(range(1, len(done_before) + 1)) and done_before[-1] > checkpoint_iter
    # in the end each iteration is recorded once, and the redone ones are the same iterations,
    # with the same batches and dropout masks: losses equal bit for bit
    after = {line["iter"]: line for line in train_lines(out_dir)}
    assert sorted(after) == list(range(1, 25)) and len(train_lines(out_dir)) == 24
    assert [line["iter"] for line in read_metrics(out_dir) if "val_loss" in line] == list(range(0, 25, 4))
    for line in before_crash:
        if "loss" in line:
            assert after[line["iter"]]["loss"] == line["loss"], line["iter"]
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 24
