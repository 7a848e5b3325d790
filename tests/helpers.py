"""What several test modules share: the repository root, generated text and WET files, the
tiny model's flags and the recipes, running train.py (in this process, as a subprocess or
under torchrun), sample.py and prepare.py, and reading what a run or a dataset holds.
Fixtures live in conftest.py, which puts the repository root on sys.path before it imports
this module; no test module imports another."""
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from owngpt import budget, dataset, tokenizer
import train

ROOT = Path(__file__).resolve().parent.parent

SYLLABLES = "ka lo mi ne ru sa ti vo pe da gu hi ba zo fe wi an or el ist ing th qu".split()
_word_rng = random.Random(0)
WORD_LIST = ["".join(_word_rng.choices(SYLLABLES, k=1 + index % 3)) for index in range(400)]


# meta.json's entry for the byte tokenizer: the 256 bytes and end-of-text, no file
BYTE_TOKENIZER = {"kind": "byte", "vocab_size": 257, "eot_id": 256, "file": None, "sha256": None}


def make_text(seed, sentences=60):
    """Deterministic text with English-like statistics: sentences of invented words drawn
    with Zipf's law (a few words are common, most are rare), with punctuation."""
    rng = random.Random(seed)
    weights = [1 / rank for rank in range(1, len(WORD_LIST) + 1)]
    lines = []
    for _ in range(sentences):
        words = rng.choices(WORD_LIST, weights, k=rng.randint(4, 14))
        lines.append(" ".join(words).capitalize() + rng.choice([".", ".", ",", "!", "?"]))
    return "\n".join(lines) + "\n"


def send_body(handler, body, broken=False):
    """Answer a GET with body, honouring an open-ended Range header (bytes=N-) with a 206;
    broken=True sends only half of what was asked and drops the connection."""
    asked = handler.headers["Range"]
    start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
    handler.send_response(206 if start else 200)
    if start:
        handler.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
    handler.send_header("Content-Length", str(len(body) - start))
    handler.end_headers()
    if broken:
        handler.wfile.write(body[start:start + (len(body) - start) // 2])
        handler.close_connection = True
    else:
        handler.wfile.write(body[start:])


def cannot_run_here(reason):
    """A test whose machinery is missing here (root for a mount, a Slurm cluster) skips with
    the reason on a developer's machine, and fails in CI, where .ci/run sets OWNGPT_NO_SKIP=1:
    there every test must have run."""
    if os.environ.get("OWNGPT_NO_SKIP") == "1":
        pytest.fail(f"cannot run here, and OWNGPT_NO_SKIP=1 says it must: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(condition, timeout=60, interval=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def make_conversations(count, seed=0):
    """count conversations in the chat format, deterministic: a question about an invented word
    and an answer made of its sentences, every fifth with a system message, every third with a
    second exchange."""
    rng = random.Random(seed)
    conversations = []
    for index in range(count):
        word = WORD_LIST[index % len(WORD_LIST)]
        messages = [{"role": "system", "content": "You answer in the island's words."}] if index % 5 == 0 else []
        messages += [{"role": "user", "content": f"What is {word}?"},
                     {"role": "assistant", "content": make_text(rng.randrange(10**6), sentences=2).strip()}]
        if index % 3 == 0:
            messages += [{"role": "user", "content": f"And {rng.choice(WORD_LIST)}?"},
                         {"role": "assistant", "content": make_text(rng.randrange(10**6), sentences=1).strip()}]
        conversations.append({"messages": messages})
    return conversations


def write_jsonl(path, records):
    Path(path).write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- WET files
def warc_record(headers, body):
    """One WARC record: the version line, the headers as given (Content-Length among them,
    or left out or wrong for a damaged record), a blank line, the body."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"WARC/1.0\r\n{lines}\r\n".encode() + body + b"\r\n\r\n"


def warcinfo(filler=b""):
    """The record a WET file starts with: what made it (filler: more bytes, for a longer file)."""
    body = b"software: test\r\n" + filler
    return warc_record({"WARC-Type": "warcinfo", "Content-Length": len(body)}, body)


def conversion(number, url, language, text):
    """A WET conversion record: the text of the page at url, with Common Crawl's headers."""
    body = text.encode()
    return warc_record({"WARC-Type": "conversion", "WARC-Target-URI": url,
                        "WARC-Date": f"2025-06-{number % 28 + 1:02d}T12:00:00Z",
                        "WARC-Record-ID": f"<urn:uuid:{number:08d}>",
                        "WARC-Identified-Content-Language": language,
                        "Content-Type": "text/plain", "Content-Length": len(body)}, body)


def gzip_members(records):
    """A .warc.wet.gz file's bytes as Common Crawl writes them: each record its own gzip member."""
    return b"".join(gzip.compress(record) for record in records)


# ----------------------------------------------------------------------------- train.py
TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2",
              "--log_interval=1", "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu"]

# The recipe of modded-nanogpt and nanochat beside GPT-2's: every promise holds for both.
# Each sets its block, optimizer and schedule itself, whatever train.py's defaults are, and
# its name lists them in that order (test_train checks the names against what the runs save).
GPT2_RECIPE = ["--block=gpt2", "--optimizer=adamw", "--lr_schedule=cosine"]
MODERN_RECIPE = ["--block=modern", "--value_embeddings=true", "--optimizer=muon", "--lr_schedule=wsd"]
RECIPES = {"gpt2_adamw_cosine": GPT2_RECIPE, "modern_muon_wsd": MODERN_RECIPE}

# One thread per process: a tiny model gains nothing from two, and on a busy 2-core machine
# two OpenMP threads that wait on each other can make each step 50x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_train(*flags, cwd=None, torchrun=False, timeout=180):
    """python train.py (or two processes of it under torchrun) with the tiny model and these
    flags; the finished process."""
    launcher = TORCHRUN if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / "train.py"), *TINY_MODEL, *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def train_in_process(*flags):
    """train.main in this process, as `python train.py` with the tiny model and these flags
    runs it, minus the seconds of starting Python and torch, in one thread (ONE_THREAD's
    reason). Returns what it exits with: the error line (sys.exit prints it, status 1), a
    status (--help), or None when it finishes. The SIGTERM and SIGINT handlers train.py
    installs are put back afterwards."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main([*TINY_MODEL, *flags])
    except SystemExit as exit:
        return exit.code
    finally:
        torch.set_num_threads(threads)
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return None


def stop_during_iteration(patch, iteration):
    """SIGTERM arrives during this iteration (the run's iteration-th, from 1), as a preemption
    would: the run finishes the iteration, saves and stops. patch: a monkeypatch context."""
    real_forward_backward, calls = train.forward_backward, []

    def forward_backward(*args, **kwargs):
        calls.append(None)
        if len(calls) == iteration:
            signal.raise_signal(signal.SIGTERM)
        return real_forward_backward(*args, **kwargs)

    patch.setattr(train, "forward_backward", forward_backward)


class SimulatedClock:
    """time.time and time.perf_counter of a machine whose iterations cost what a test says:
    max_time's arithmetic checked exactly, whatever the real machine is doing."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    perf_counter = time


def simulate_machine(patch, clock, seconds_of_iteration):
    """train.py and its budget read clock; each iteration advances it by seconds_of_iteration(i)."""
    real_forward_backward, calls = train.forward_backward, []

    def forward_backward(*args, **kwargs):
        calls.append(None)
        clock.now += seconds_of_iteration(len(calls))
        return real_forward_backward(*args, **kwargs)

    patch.setattr(train, "forward_backward", forward_backward)
    patch.setattr(train, "time", clock)
    patch.setattr(budget, "time", clock)


TIMING_KEYS = {"elapsed_s", "ms_per_iter", "tokens_per_s", "sample_s"}


def without_timings(lines):
    return [{key: value for key, value in line.items() if key not in TIMING_KEYS} for line in lines]


def assert_same(saved, other, where):
    """Equal tensors, bit for bit, at every place of two nested dicts and lists."""
    if isinstance(saved, torch.Tensor):
        assert torch.equal(saved, other), where
    elif isinstance(saved, dict):
        assert saved.keys() == other.keys(), where
        for key in saved:
            assert_same(saved[key], other[key], f"{where}[{key!r}]")
    elif isinstance(saved, (list, tuple)):
        assert len(saved) == len(other), where
        for index, (item, other_item) in enumerate(zip(saved, other)):
            assert_same(item, other_item, f"{where}[{index}]")
    else:
        assert saved == other, where


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_lines(out_dir):
    return [line for line in read_metrics(out_dir) if "loss" in line]


def eval_lines(out_dir):
    return [line for line in read_metrics(out_dir) if "val_loss" in line]


def trained_iterations(out_dir):
    path = out_dir / "metrics.jsonl"
    return len(train_lines(out_dir)) if path.exists() else 0


def checkout(folder):
    """A copy of the scripts, owngpt/ and launch/ in folder, as a user's clone: the launch
    files run from it, so their logs stay out of this checkout. Returns folder."""
    folder.mkdir(parents=True)
    for name in ("prepare.py", "train.py", "model.py"):
        shutil.copy(ROOT / name, folder)
    for name in ("owngpt", "launch"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


# ----------------------------------------------------------------------------- sample.py
def run_sample(*flags, cwd=ROOT):
    """python sample.py with these flags; the finished process, its output read as UTF-8."""
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *flags], cwd=cwd, capture_output=True,
                          text=True, encoding="utf-8", timeout=120, env=ONE_THREAD)


# ----------------------------------------------------------------------------- prepare.py
def run_prepare(*flags, cwd, env=None, check=True):
    """Runs `python prepare.py flags...` in cwd; returns the CompletedProcess (text)."""
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *flags], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"prepare.py failed:\n{result.stderr}")
    return result


def documents_in(folder, split):
    """The documents of a split, decoded: the tokens between end-of-text tokens."""
    meta = dataset.read_meta(folder)
    encoder = tokenizer.load_tokenizer(folder)
    tokens = np.concatenate([dataset.read_shard(folder / name) for name in meta["splits"][split]["shards"]])
    starts = np.flatnonzero(tokens == encoder.eot_token)
    assert starts[0] == 0, "a split must start with the end-of-text token"
    return [encoder.decode(tokens[start + 1:end].tolist())
            for start, end in zip(starts, list(starts[1:]) + [len(tokens)])]


def kept_documents(folder):
    """The kept documents, whole: train's and val's, or, where val holds each document's
    tail (too few documents for whole ones), each train head joined to its val tail."""
    train, val = documents_in(folder, "train"), documents_in(folder, "val")
    if dataset.read_meta(folder)["split_rule"]["rule"] != "tails":
        return train + val
    assert len(train) == len(val)
    return [head + tail for head, tail in zip(train, val)]


def bin_files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.suffix in (".bin", ".tiktoken")}
