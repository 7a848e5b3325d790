"""Shared test setup: make the project's top-level scripts importable, and shared fixtures."""
import http.server
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or times the machine; deselect with -m 'not slow'")


SYLLABLES = "ka lo mi ne ru sa ti vo pe da gu hi ba zo fe wi an or el ist ing th qu".split()
_word_rng = random.Random(0)
WORD_LIST = ["".join(_word_rng.choices(SYLLABLES, k=1 + index % 3)) for index in range(400)]


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


@pytest.fixture(scope="module")
def one_thread():
    """Models this small gain nothing from a second thread, which stalls whenever another
    process shares the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
