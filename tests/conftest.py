"""Shared test setup: make the project's top-level scripts importable, and the fixtures
several modules use. Plain functions and constants they share are in helpers.py."""
import http.server
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402 (this import and the next need the root on sys.path)
from helpers import (ONE_THREAD, TINY_MODEL, cannot_run_here, make_conversations, make_text, send_body,  # noqa: E402
                     write_jsonl)
from slurm_cluster import SlurmCluster, missing_machinery  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: several train.py or prepare.py processes, torchrun, the README and WORKSHOP commands, "
                   "or a long run; `-m \"not slow\"` leaves them out (under a minute in 2 processes)")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A dataset folder built by `prepare.py` from 24 small generated text files:
    a 512-token BPE, 4096-token shards, about 16k tokens in all (20 train documents in 4
    shards, 4 val documents in 1). Returns its Path."""
    corpus = tmp_path_factory.mktemp("tiny_corpus")
    for index in range(24):
        (corpus / f"doc_{index:02d}.txt").write_text(make_text(index), encoding="utf-8")
    folder = tmp_path_factory.mktemp("tiny_dataset") / "tiny"
    # a relative --input: the document ids, and so the documents the hash puts in val, are the
    # same in every session
    result = subprocess.run(
        [sys.executable, str(ROOT / "prepare.py"), "--source=files", f"--input={corpus.name}",
         f"--out_dir={folder}", "--tokenizer=bpe", "--vocab_size=512", "--shard_tokens=4096",
         "--val_fraction=0.2", "--num_workers=1"],
        capture_output=True, text=True, cwd=corpus.parent)
    assert result.returncode == 0, f"prepare.py failed:\n{result.stderr}"
    return folder


@pytest.fixture(scope="session")
def tiny_chat_dataset(tiny_dataset, tmp_path_factory):
    """A chat dataset of 120 generated conversations (helpers.make_conversations), with the tiny
    dataset's tokenizer and its chat tokens, as one fine-tunes a model trained on it."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    write_jsonl(folder / "conversations.jsonl", make_conversations(120))
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--source=chat",
                             "--input=conversations.jsonl", f"--tokenizer={tiny_dataset}", "--out_dir=chat",
                             "--val_fraction=0.1"], capture_output=True, text=True, cwd=folder)
    assert result.returncode == 0, f"prepare.py failed:\n{result.stderr}"
    return folder / "chat"


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_dataset, tmp_path_factory):
    """The out folder of the tiny model (helpers.TINY_MODEL) trained 30 iterations on
    tiny_chat_dataset: a model chat.py talks to (what it says is of no interest)."""
    out_dir = tmp_path_factory.mktemp("tiny_chat_model") / "out"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY_MODEL, f"--dataset={tiny_chat_dataset}",
                             f"--out_dir={out_dir}", "--max_iters=30", "--eval_interval=30", "--matmul=mkl"],
                            capture_output=True, text=True, env=ONE_THREAD, timeout=300)
    assert result.returncode == 0, f"train.py failed:\n{result.stderr}"
    (out_dir / "stdout.txt").write_text(result.stdout)  # what the run said, for the tests that read it
    return out_dir


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, which stalls whenever another
    process shares the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_here(capsys, one_thread):
    """train.main in this process, as `python train.py` with the tiny model runs it, minus the
    seconds of starting Python and torch. Returns (exit status, stdout, stderr). The SIGTERM
    and SIGINT handlers train.py installs are put back afterwards."""
    def run(*flags):
        handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            train.main([*TINY_MODEL, *flags])
            status, message = 0, ""
        except SystemExit as exit:  # sys.exit("error: ...") prints the message and exits with 1
            status, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code, "")
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        output = capsys.readouterr()
        return SimpleNamespace(returncode=status, stdout=output.out, stderr=output.err + message)

    return run


@pytest.fixture
def book_server():
    """(url, text): one plain-text book of about 130 KB served by a real http.server on
    127.0.0.1, Range requests honoured."""
    book = "".join(make_text(seed, sentences=120) for seed in range(30)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            send_body(self, book)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/book.txt", book
    server.shutdown()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node Slurm cluster (slurm_cluster.py), started the first time a test of this
    process asks for it and stopped at the end: each pytest-xdist worker has its own."""
    missing = missing_machinery()
    if missing:
        cannot_run_here(f"no Slurm cluster can start here: {missing}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
