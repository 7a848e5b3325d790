"""Shared test setup: make the project's top-level scripts importable, and the fixtures
several modules use. Plain functions and constants they share are in helpers.py."""
import http.server
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import (cannot_run_here, make_conversations, make_text, run_prepare, run_train, send_body,  # noqa: E402
                     train_in_process, write_jsonl)  # (helpers and slurm_cluster need the root on sys.path)
from slurm_cluster import SlurmCluster, missing_machinery  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: several train.py or prepare.py processes, torchrun, the README and WORKSHOP commands, "
                   "or a long run; `-m \"not slow\"` leaves them out (under a minute in 2 processes)")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A dataset folder built by `prepare.py` from 24 small generated text files:
    a 512-token BPE (516 ids with the chat tokens), 4096-token shards, about 16k tokens in all (20 train documents in 4
    shards, 4 val documents in 1). Returns its Path."""
    corpus = tmp_path_factory.mktemp("tiny_corpus")
    for index in range(24):
        (corpus / f"doc_{index:02d}.txt").write_text(make_text(index), encoding="utf-8")
    folder = tmp_path_factory.mktemp("tiny_dataset") / "tiny"
    # a relative --input: the document ids, and so the documents the hash puts in val, are the
    # same in every session
    run_prepare("--source=files", f"--input={corpus.name}", f"--out_dir={folder}", "--tokenizer=bpe",
                "--vocab_size=512", "--shard_tokens=4096", "--val_fraction=0.2", "--num_workers=1", cwd=corpus.parent)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_dataset(tiny_dataset, tmp_path_factory):
    """A chat dataset of 120 generated conversations (helpers.make_conversations), with the tiny
    dataset's tokenizer and its chat tokens, as one fine-tunes a model trained on it."""
    folder = tmp_path_factory.mktemp("tiny_chat")
    write_jsonl(folder / "conversations.jsonl", make_conversations(120))
    run_prepare("--source=chat", "--input=conversations.jsonl", f"--tokenizer={tiny_dataset}", "--out_dir=chat",
                "--val_fraction=0.1", cwd=folder)
    return folder / "chat"


@pytest.fixture(scope="session")
def tiny_chat_model(tiny_chat_dataset, tmp_path_factory):
    """The out folder of the tiny model (helpers.TINY_MODEL) trained 30 iterations on
    tiny_chat_dataset: a model chat.py talks to (what it says is of no interest)."""
    out_dir = tmp_path_factory.mktemp("tiny_chat_model") / "out"
    result = run_train(f"--dataset={tiny_chat_dataset}", f"--out_dir={out_dir}", "--max_iters=30",
                       "--eval_interval=30", "--matmul=mkl", timeout=300)
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
def train_here(capsys):
    """train.main in this process (helpers.train_in_process), with what it printed: returns
    (exit status, stdout, stderr)."""
    def run(*flags):
        code = train_in_process(*flags)
        status, message = (1, code) if isinstance(code, str) else (code or 0, "")
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
