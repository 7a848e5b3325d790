"""The commands README.md and WORKSHOP.md show all run: every line of their ```bash blocks that can run here
(offline, on a CPU) runs in order in one folder, as a reader would type it, with small
overrides that keep it short (a tiny model, a few iterations). A local http.server on
127.0.0.1 stands in for the book the README downloads."""
import json
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ONE_THREAD, ROOT, make_text

pytestmark = pytest.mark.slow  # each test runs every command of a document: tens of seconds

# What makes each script quick: a tiny model for a few iterations, a few documents.
SHORTER = {
    "prepare.py": ["--max_docs=60"],
    "train.py": ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4",
                 "--eval_interval=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=1", "--device=cpu"],
    "sample.py": ["--max_new_tokens=8", "--device=cpu"],
    "chat.py": ["--max_new_tokens=8", "--device=cpu"],
}
# Lines that cannot run here, and why.
NOT_HERE = {
    "torchrun": "needs several GPUs",
    "--source=commoncrawl": "needs the network",
    "--tokenizer=gpt2": "needs the network once (tiktoken's files)",
    "hf:gpt2": "needs GPT-2's weights, downloaded",
    "hf download": "needs the network",
    "pip install": "installs",
    "bench.py": "runs for minutes (it is measured, not tested)",
    "train_gpt2_124m.py": "a 124M-parameter model",
    "python -c": "a multi-line Python snippet (tests/test_export.py runs the same)",
    "-m pytest": "the test command itself",
    "--serve": "a server, which runs until stopped (tests/test_serve.py starts it)",
}
BOOK = "https://www.gutenberg.org/cache/epub/100/pg100.txt"


def commands(markdown):
    """Every command of the ```bash blocks (lines joined by && are several), comments cut."""
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                yield from line.split(" && ")


def inputs_for_the_examples(folder):
    """The files the README's examples read: notes, a book, a .jsonl, a folder of documents."""
    (folder / "notes").mkdir()
    (folder / "my_docs").mkdir()
    (folder / "my_notes").mkdir()
    for index in range(6):
        for name in ("notes", "my_docs", "my_notes"):
            (folder / name / f"{index}.md").write_text(make_text(index, sentences=80), encoding="utf-8")
    (folder / "book.txt").write_text(make_text(99, sentences=400), encoding="utf-8")
    (folder / "data.jsonl").write_text("".join(json.dumps({"content": make_text(seed)}) + "\n" for seed in range(20)))


def run_commands(markdown, folder, url):
    """Runs the commands that can run here, in order, in folder; returns them."""
    ran = []
    (folder / "config").mkdir(exist_ok=True)  # the quiz the guides score models on, where they name it
    (folder / "config" / "python_quiz.jsonl").write_bytes((ROOT / "config" / "python_quiz.jsonl").read_bytes())
    for command in commands(markdown):
        if not command.startswith("python ") or any(marker in command for marker in NOT_HERE) or command in ran:
            continue  # a command shown twice (the quick start, then under Training) is typed once
        words = shlex.split(command.replace(BOOK, url) if url else command)
        # the scripts and config files of the repository; the data and out folders in folder
        words = [str(ROOT / word) if word.endswith(".py") and (ROOT / word).is_file() else word for word in words]
        finished = subprocess.run([sys.executable, *words[1:], *SHORTER.get(words[1].rpartition("/")[2], [])], cwd=folder,
                                  capture_output=True, text=True, timeout=300, env=ONE_THREAD)
        assert finished.returncode == 0, f"{command}\n{finished.stderr[-2000:]}"
        assert "Traceback" not in finished.stderr, command
        ran.append(command)
    return ran


def test_every_readme_command_that_can_run_here_runs(tmp_path, book_server):
    inputs_for_the_examples(tmp_path)
    ran = run_commands((ROOT / "README.md").read_text(), tmp_path, book_server[0])
    for script in ("prepare.py", "train.py", "sample.py", "export.py", "plot.py"):
        assert any(f"python {script}" in line for line in ran), f"no README command of {script} ran"


def test_every_workshop_command_runs(tmp_path):
    """WORKSHOP.md's commands, in order, from a folder holding the files it trains on."""
    for name in ("model.py", "train.py", "prepare.py"):  # the guide's own tiny corpus
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    ran = run_commands((ROOT / "WORKSHOP.md").read_text(), tmp_path, url=None)
    assert len(ran) >= 15 and any("plot.py" in command for command in ran)
