"""Faults and bad input, each tried for real: a rank killed under torchrun --max-restarts,
a full disk and a read-only disk (small tmpfs mounts), an out_dir that is a file, damaged
and mismatched datasets, mismatched checkpoints, pickles that carry code, and downloads
that try to leave the dataset folder. Every case must end in a clear message naming the
file, key or value, a non-zero exit, and nothing already written damaged."""
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from helpers import (ONE_THREAD, ROOT, TINY_MODEL, cannot_run_here, eval_lines, make_text, train_in_process,
                     train_lines, trained_iterations, wait_until)
from owngpt import checkpoint, dataset
from owngpt.web import crawl
import prepare
import sample


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


def cpu_ticks(pid):
    """User plus system CPU time a process has used, in clock ticks (from /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def blocked(pid, seconds=0.5):
    """True when the process used no CPU for a while: waiting, not computing."""
    before = cpu_ticks(pid)
    time.sleep(seconds)
    return cpu_ticks(pid) == before


ITERATIONS = 80  # long enough that the freeze below lands mid-run on a loaded machine (24 once ran out)


def stop_past_a_checkpoint(rank_0, rank_1, out_dir):
    """Freeze rank 1 (SIGSTOP) at a point where the first attempt has trained past its newest
    checkpoint, so that the restart must redo iterations. Once rank 1 is frozen, rank 0 runs
    on to the next collective that needs rank 1 and waits there, using no CPU: from then on
    the record on disk is the whole record of the first attempt. When the freeze landed just
    after a checkpoint, let rank 1 go on to the next iteration and freeze it again.
    Returns (the metrics lines of the first attempt, its newest checkpoint's iteration)."""
    for _ in range(30):
        os.kill(rank_1, signal.SIGSTOP)
        wait_until(lambda: blocked(rank_0), timeout=60)
        record = lines_so_far(out_dir)
        checkpoint_iter = json.loads((out_dir / "checkpoints.json").read_text())["checkpoints"][-1]["iter"]
        done = [line["iter"] for line in record if "loss" in line]
        assert done[-1] < ITERATIONS - 4, "the run came near its end before rank 1 was frozen past a checkpoint"
        if done[-1] > checkpoint_iter:
            return record, checkpoint_iter
        os.kill(rank_1, signal.SIGCONT)
        wait_until(lambda: trained_iterations(out_dir) > done[-1], timeout=60)
    raise AssertionError("rank 1 was frozen at a checkpoint 30 times in a row")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's worker processes in /proc")
def test_a_rank_killed_mid_run_makes_torchrun_restart_the_group_which_resumes_from_its_last_checkpoint(tiny_dataset, tmp_path):
    # a static rendezvous on a free port (--standalone's c10d one has a known restart problem on
    # CPU): torchrun's agent stays up and restarts both workers when one dies
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0", "--nproc-per-node=2",
                "--max-restarts=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    flags = [*TINY_MODEL, f"--dataset={tiny_dataset}", "--out_dir=out", "--gradient_accumulation_steps=2",
             "--eval_interval=4", f"--max_iters={ITERATIONS}"]
    out_dir, log = tmp_path / "out", tmp_path / "torchrun.log"
    group = subprocess.Popen([*torchrun, str(ROOT / "train.py"), *flags], cwd=tmp_path, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env=ONE_THREAD)
    try:
        wait_until(lambda: (out_dir / "metrics.jsonl").exists() and trained_iterations(out_dir) >= 6, timeout=120)
        rank_0, rank_1 = worker_pid(group.pid, rank=0), worker_pid(group.pid, rank=1)
        assert rank_0 and rank_1, "no process of rank 0 or 1 among torchrun's children"
        before_crash, checkpoint_iter = stop_past_a_checkpoint(rank_0, rank_1, out_dir)
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
    assert sorted(after) == list(range(1, ITERATIONS + 1)) and len(train_lines(out_dir)) == ITERATIONS
    assert [line["iter"] for line in eval_lines(out_dir)] == list(range(0, ITERATIONS + 1, 4))
    for line in before_crash:
        if "loss" in line:
            assert after[line["iter"]]["loss"] == line["loss"], line["iter"]
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == ITERATIONS


# ----------------------------------------------------------------------------- train.py in this process
def run_main(*flags):
    """train.main in this process, evaluating and saving every iteration: the message it exits
    with, or None when it finishes."""
    return train_in_process("--eval_interval=1", *flags)


def contents(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def saved_run(tiny_dataset, tmp_path_factory):
    """Two iterations with a checkpoint after each: out_dir holds ckpt_0000001.pt and ckpt_0000002.pt."""
    out_dir = tmp_path_factory.mktemp("saved") / "out"
    assert run_main(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=2") is None
    return out_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(saved_run, out_dir)
    return out_dir


@pytest.mark.parametrize("variable, restart", [("TORCHELASTIC_RESTART_COUNT", "torchrun restart 1"),
                                               ("SLURM_RESTART_COUNT", "Slurm requeue 1")])
def test_a_restart_over_another_runs_checkpoints_is_refused_naming_the_difference(variable, restart, run_copy,
                                                                                   tiny_dataset, monkeypatch):
    # the first attempt of this command refused to start over them; the restart must not resume them either
    monkeypatch.setenv(variable, "1")
    before = contents(run_copy)
    message = run_main(f"--dataset={tiny_dataset}", f"--out_dir={run_copy}", "--max_iters=3")
    assert f"{restart}: " in message and "ckpt_0000002.pt belongs to another run (max_iters is 2 there, 3 here)" in message
    assert contents(run_copy) == before


# ----------------------------------------------------------------------------- bad datasets
def write_shard(path, tokens, magic=20240520, version=1, dtype="<u2"):
    """A shard in the llm.c format: 256 int32 header (magic, version, token count), tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    path.write_bytes(header.tobytes() + np.asarray(tokens).astype(dtype).tobytes())


def tokens_of(path):
    return np.array(dataset.read_shard(path))


def truncate(folder):
    path = folder / "train_000001.bin"
    path.write_bytes(path.read_bytes()[:-100])


def bad_magic(folder):
    path = folder / "train_000001.bin"
    path.write_bytes((12345).to_bytes(4, "little") + path.read_bytes()[4:])


def uint32_header(folder):
    path = folder / "train_000001.bin"
    write_shard(path, tokens_of(path), magic=20240801, version=7, dtype="<u4")


def fewer_tokens(folder):
    path = folder / "train_000001.bin"
    write_shard(path, tokens_of(path)[:-10])  # a consistent shard, but not the one meta.json counted


def token_beyond_vocabulary(folder):
    path = folder / "train_000001.bin"
    tokens = tokens_of(path)
    tokens[5] = 516  # the tokenizer has 516 ids: 0 to 515 (the BPE's 512 and the chat tokens)
    write_shard(path, tokens)


def missing_shard(folder):
    (folder / "val_000000.bin").unlink()


def meta_cut_short(folder):
    (folder / "meta.json").write_bytes((folder / "meta.json").read_bytes()[:50])


def emptied(folder):
    for path in folder.iterdir():
        path.unlink()


@pytest.mark.parametrize("damage, message", [
    (truncate, r"train_000001.bin: the header says \d+ tokens, so \d+ bytes, but the file has \d+ bytes"),
    (bad_magic, r"train_000001.bin: bad magic number 12345"),
    (uint32_header, r"train_000001.bin holds uint32 tokens but meta.json says uint16"),
    (fewer_tokens, r"meta.json says the train split has [\d,]+ tokens, its shards hold [\d,]+"),
    (token_beyond_vocabulary, r"train_000001.bin holds token id 516, but the tokenizer has only 516 ids"),
    (missing_shard, r"meta.json lists val_000000.bin, which is missing"),
    (meta_cut_short, r"meta.json is not valid JSON"),
    (emptied, r"has no meta.json: it is empty or was not made by prepare.py"),
])
def test_a_damaged_dataset_stops_a_resumed_run_before_it_touches_out_dir(damage, message, tiny_dataset, run_copy, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    damage(dataset)
    before = contents(run_copy)
    error = run_main(f"--dataset={dataset}", f"--out_dir={run_copy}", "--max_iters=4", "--init_from=resume")
    assert re.search(message, error), error
    assert str(dataset) in error and error.startswith("error: ")
    assert contents(run_copy) == before


def test_a_dataset_with_another_bpe_of_the_same_size_is_refused_on_resume(tiny_dataset, run_copy, tmp_path):
    # as if prepared again from other text: same kind, size and end-of-text id, other merges
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    lines = (dataset / "tokenizer.tiktoken").read_text().splitlines()
    (first, first_rank), (second, second_rank) = lines[256].split(), lines[257].split()
    lines[256:258] = [f"{second} {first_rank}", f"{first} {second_rank}"]
    (dataset / "tokenizer.tiktoken").write_text("\n".join(lines) + "\n")
    meta = json.loads((dataset / "meta.json").read_text())
    trained_with = meta["tokenizer"]["sha256"]
    meta["tokenizer"]["sha256"] = hashlib.sha256((dataset / "tokenizer.tiktoken").read_bytes()).hexdigest()
    (dataset / "meta.json").write_text(json.dumps(meta))
    before = contents(run_copy)
    error = run_main(f"--dataset={dataset}", f"--out_dir={run_copy}", "--max_iters=4", "--init_from=resume")
    assert "ckpt_0000002.pt was trained with a different tokenizer than" in error and str(dataset) in error
    assert f"sha256 is '{trained_with}' there and '{meta['tokenizer']['sha256']}' here" in error
    assert contents(run_copy) == before


@pytest.mark.parametrize("flag, message", [
    ("--n_layer=3", "has n_layer=2 but the config says n_layer=3"),
    ("--block_size=16", "has block_size=32 but the config says block_size=16"),
    ("--bias=True", "has bias=False but the config says bias=True"),
])
def test_resume_with_another_architecture_stops_naming_the_field_and_both_values_before_touching_out_dir(flag, message, tiny_dataset, run_copy):
    before = contents(run_copy)
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={run_copy}", "--max_iters=4", "--init_from=resume", flag)
    assert f"{run_copy / 'ckpt_0000002.pt'} {message}" in error
    assert contents(run_copy) == before


# ----------------------------------------------------------------------------- out_dir and disks
@pytest.fixture
def small_disk(tmp_path):
    """mount_disk(size) mounts a tmpfs of that size at tmp_path/disk: a real file system
    that fills up or turns read-only (root can write to any folder, so chmod proves nothing)."""
    mounted = []

    def mount_disk(size):
        disk = tmp_path / "disk"
        disk.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            cannot_run_here(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(disk)
        return disk

    yield mount_disk
    for disk in mounted:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_out_dir_that_is_a_file_is_refused_before_training(tiny_dataset, tmp_path):
    notes = tmp_path / "notes"
    notes.write_text("not a folder")
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={notes}", "--max_iters=2")
    assert error == f"error: out_dir {notes} is a file, not a folder: choose another out_dir"
    assert notes.read_text() == "not a folder"


def test_a_read_only_out_dir_is_refused_before_training_and_left_as_it_was(small_disk, saved_run, tiny_dataset):
    disk = small_disk("8m")
    shutil.copytree(saved_run, disk / "out")
    before = contents(disk / "out")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={disk / 'out'}", "--max_iters=4", "--init_from=resume")
    assert error == f"error: out_dir {disk / 'out'} is not writable: Read-only file system"
    assert contents(disk / "out") == before


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_training(small_disk, tiny_dataset):
    disk = small_disk("1m")
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={disk / 'out'}", "--max_iters=2", "--block=gpt2")  # sizes: the tied head
    # 4 checkpoints of ~0.5 MB: keep_last=2, best.pt and the one being written
    assert re.fullmatch(r"error: \S+/out has 1.0 MB free, but its checkpoints will need 2.1 MB more \(4 of ~0.5 MB: "
                        r"keep_last=2, best.pt and the one being written\): make room, lower keep_last, or choose "
                        r"another out_dir", error), error
    assert not (disk / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_disk_that_fills_while_saving_stops_the_run_and_the_previous_checkpoint_survives(small_disk, tiny_dataset, tmp_path):
    disk = small_disk("4m")
    out_dir, log = disk / "out", tmp_path / "train.log"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY_MODEL, f"--dataset={tiny_dataset}",
                                f"--out_dir={out_dir}", "--eval_interval=3", "--max_iters=100000"],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT, env=ONE_THREAD)
    try:
        wait_until(lambda: (out_dir / "checkpoints.json").exists() and trained_iterations(out_dir) >= 4)
        process.send_signal(signal.SIGSTOP)
        # another program takes the disk, all but 100 kB: room for log lines, not for a checkpoint
        (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - 100_000))
        process.send_signal(signal.SIGCONT)
        assert process.wait(timeout=60) == 1
    finally:
        process.kill()
    text = log.read_text()
    failed_at = int(re.search(r"error: saving iteration (\d+) into \S+ failed: No space left on device\. The "
                              r"checkpoints recorded in checkpoints.json are intact", text)[1])
    assert "Traceback" not in text
    path, saved = checkpoint.newest_valid_checkpoint(out_dir)  # size and sha256 as recorded
    assert saved["iter_num"] == failed_at - 3 and path.name == f"ckpt_{failed_at - 3:07d}.pt"
    assert not list(out_dir.glob(".*.tmp"))  # the half-written checkpoint is gone
    assert [line["iter"] for line in train_lines(out_dir)] == list(range(1, failed_at + 1))


# ----------------------------------------------------------------------------- security
class CodePayload:
    """Unpickled, this runs os.mkdir(marker): what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


REFUSED = (r"does not load as a checkpoint: it holds a Python object \((posix|nt)\.mkdir\), and loading one can run "
           r"any code, so it is refused")


def test_a_checkpoint_carrying_code_is_refused_by_init_from(tiny_dataset, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"model": CodePayload(marker)}, tmp_path / "payload.pt")
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path / 'out'}", f"--init_from={tmp_path / 'payload.pt'}")
    assert re.search(str(tmp_path / "payload.pt") + " " + REFUSED, error), error
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_recorded_checkpoint_replaced_by_code_is_refused_and_resume_takes_the_one_before(tiny_dataset, run_copy, tmp_path, capsys):
    # the file and its record in checkpoints.json both replaced, so size and sha256 agree: only weights_only stops it
    marker = tmp_path / "code_ran"
    newest = run_copy / "ckpt_0000002.pt"
    newest.unlink()  # ckpt.pt and best.pt are hard links to it: they keep the real checkpoint
    torch.save({"model": CodePayload(marker)}, newest)
    manifest = json.loads((run_copy / "checkpoints.json").read_text())
    manifest["checkpoints"][-1].update(bytes=newest.stat().st_size, sha256=hashlib.sha256(newest.read_bytes()).hexdigest())
    (run_copy / "checkpoints.json").write_text(json.dumps(manifest))
    assert run_main(f"--dataset={tiny_dataset}", f"--out_dir={run_copy}", "--max_iters=2", "--init_from=resume") is None
    output = capsys.readouterr()
    assert re.search(f"warning: skipping damaged checkpoint {newest}: {newest} {REFUSED}", output.err), output.err
    assert f"resuming from {run_copy / 'ckpt_0000001.pt'} at iteration 1, exactly" in output.out
    assert not marker.exists()
    assert torch.load(run_copy / "ckpt_0000002.pt", weights_only=True)["iter_num"] == 2  # iteration 2 again, for real


def test_sample_refuses_a_checkpoint_carrying_code(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    torch.save({"model": CodePayload(marker)}, tmp_path / "best.pt")
    assert sample.main([f"--out_dir={tmp_path}", "--device=cpu"]) == 1
    assert re.search(str(tmp_path / "best.pt") + " " + REFUSED, capsys.readouterr().err)
    assert not marker.exists()


class HostileServer(http.server.BaseHTTPRequestHandler):
    """Redirects and file names chosen to leave the dataset folder, and a redirect to file://."""
    requested = []

    def do_GET(self):
        self.requested.append(self.path)
        if self.path == "/local":
            self.redirect("file:///etc/passwd")
        elif self.path == "/book.txt":
            self.redirect("/..%2F..%2Fescape.txt")
        else:
            body = make_text(len(self.path)).encode()
            self.send_response(200)
            self.send_header("Content-Disposition", f'attachment; filename="{self.server.escape_to}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile_server(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileServer)
    server.escape_to = str(tmp_path / "escaped.txt")  # an absolute name, outside the dataset folder
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_stay_in_the_dataset_folder_whatever_names_the_server_sends(hostile_server, tmp_path):
    urls = [f"{hostile_server}/book.txt", f"{hostile_server}/second.txt"]
    prepare.main(["--source=url", f"--url={','.join(urls)}", "--tokenizer=byte", f"--out_dir={tmp_path / 'data'}"])
    assert "/..%2F..%2Fescape.txt" in HostileServer.requested  # the redirect was followed
    downloads = tmp_path / "data" / "downloads"
    assert sorted(path.name for path in downloads.iterdir()) == sorted(crawl.download_name(url) for url in urls)
    assert [path.name for path in tmp_path.iterdir()] == ["data"]  # nothing beside it, no escaped.txt


def test_a_download_redirected_to_a_local_file_is_refused(hostile_server, tmp_path):
    url = f"{hostile_server}/local"
    with pytest.raises(crawl.WebTextError, match=f"download failed: {url} redirected to a URL that is not http"):
        prepare.main(["--source=url", f"--url={url}", "--tokenizer=byte", f"--out_dir={tmp_path / 'data'}"])
    assert not (tmp_path / "data").exists()


def remove_records(out_dir):
    for path in out_dir.iterdir():
        path.unlink()


def damage_every_checkpoint(out_dir):
    for path in out_dir.glob("ckpt_*.pt"):
        path.write_bytes(path.read_bytes()[:1000])  # ckpt.pt and best.pt are the same files


def cut_the_record(out_dir):
    (out_dir / "checkpoints.json").write_text('{"checkpoints": [')


@pytest.mark.parametrize("damage, message", [
    (remove_records, r"init_from=resume: \S+ holds no recorded checkpoint \(checkpoints.json\)"),
    (damage_every_checkpoint, r"no valid checkpoint in \S+: all 2 recorded ones are damaged"),
    (cut_the_record, r"checkpoints.json is not a checkpoint record written by train.py"),
])
def test_resume_without_a_usable_checkpoint_says_what_is_wrong(damage, message, tiny_dataset, run_copy):
    damage(run_copy)
    before = contents(run_copy)
    error = run_main(f"--dataset={tiny_dataset}", f"--out_dir={run_copy}", "--max_iters=4", "--init_from=resume")
    assert re.search(message, error) and str(run_copy) in error, error
    assert contents(run_copy) == before
