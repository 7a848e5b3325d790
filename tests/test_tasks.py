"""Multiple-choice tasks (owngpt/tasks.py): HellaSwag downloaded once from a server and read
offline after, your own .jsonl items, acc and acc_norm on a hand-built model whose answers are
known, one-line errors for malformed items, two processes counting what one counts, and
train.py scoring the tasks at each evaluation (into metrics.jsonl and curves.svg) and under eval_only."""
import dataclasses
import http.server
import json
import random
import subprocess
import threading
import xml.etree.ElementTree as ElementTree
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from helpers import BYTE_TOKENIZER, ONE_THREAD, ROOT, TORCHRUN, eval_lines, send_body
from model import GPT, GPTConfig
from owngpt import hf, tasks
from owngpt.tokenizer import load_tokenizer
from owngpt.web import crawl

BYTES = load_tokenizer(None, BYTE_TOKENIZER)
ONE_PROCESS = SimpleNamespace(rank=0, world_size=1, is_main=True, device=torch.device("cpu"), autocast=nullcontext())

# Lines in the exact format of rowanz/hellaswag's data/hellaswag_val.jsonl (the first is the
# example llm.c's hellaswag.py quotes; the others are made up in the same style)
HELLASWAG_LINES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Baking cookies", "ctx_a": "A woman pours flour into a bowl.", "ctx_b": "she",
     "ctx": "A woman pours flour into a bowl. she", "split": "val", "split_type": "zeroshot", "label": 0,
     "endings": ["stirs in the sugar with a wooden spoon.", "throws the bowl at the dog.",
                 "paints the ceiling blue.", "jumps over a fence."], "source_id": "activitynet~v_made_up_01"},
    {"ind": 106, "activity_label": "Washing a car", "ctx_a": "A boy sprays water on a red car.", "ctx_b": "the boy",
     "ctx": "A boy sprays water on a red car. the boy", "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["eats the hose.", "flies into the sky.", "scrubs the door with a sponge.", "sings to the tires."],
     "source_id": "activitynet~v_made_up_02"},
    {"ind": 3120, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a cactus [title] Feel the soil.",
     "ctx_b": "", "ctx": "[header] How to water a cactus [title] Feel the soil.", "split": "val",
     "split_type": "zeroshot", "label": 1,
     "endings": ["[step] Pour the soil into the sink.", "[step] Water only when the top inch is dry.",
                 "[step] Sing loudly to the cactus.", "[step] Paint the pot every day."],
     "source_id": "wikihow~made_up_03"},
    {"ind": 4001, "activity_label": "Playing guitar", "ctx_a": "A man holds a guitar on his lap.", "ctx_b": "he",
     "ctx": "A man holds a guitar on his lap. he", "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["strums the strings and sings.", "eats the guitar.", "throws it into a lake.", "folds it in half."],
     "source_id": "activitynet~v_made_up_04"},
    {"ind": 5017, "activity_label": "Running a marathon", "ctx_a": "Runners gather at a starting line.",
     "ctx_b": "they", "ctx": "Runners gather at a starting line. they", "split": "val", "split_type": "zeroshot",
     "label": 3, "endings": ["fall asleep at once.", "build a house.", "swim across the road.",
                             "start running when the gun fires."], "source_id": "activitynet~v_made_up_05"},
]
HELLASWAG_FILE = "".join(json.dumps(line) + "\n" for line in HELLASWAG_LINES).encode()


@pytest.fixture
def hellaswag_server(monkeypatch, tmp_path):
    """Serves HELLASWAG_FILE on 127.0.0.1 at tasks.HELLASWAG_URL (the first answer cut off half
    way when break_first is set), in tmp_path as the working directory (so data/hellaswag/ is
    there). Returns the server's state: ranges, the Range header of each request so far."""
    served = SimpleNamespace(ranges=[], break_first=False)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.ranges.append(self.headers["Range"])
            send_body(self, HELLASWAG_FILE, broken=served.break_first and len(served.ranges) == 1)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tasks, "HELLASWAG_URL", f"http://127.0.0.1:{server.server_address[1]}/hellaswag_val.jsonl")
    monkeypatch.chdir(tmp_path)
    yield served
    server.shutdown()


def write_items(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


# ----------------------------------------------------------------------------- sources
def test_hellaswag_is_downloaded_once_then_read_offline(hellaswag_server, tmp_path, monkeypatch):
    hellaswag_server.break_first = True  # the transfer stops half way: the download goes on from there
    monkeypatch.setattr(crawl, "DOWNLOAD_BLOCK", 256)  # blocks smaller than the file, so some arrive
    first = tasks.load_tasks(("hellaswag",), 0, BYTES, "scratch", ONE_PROCESS)
    assert hellaswag_server.ranges == [None, f"bytes={len(HELLASWAG_FILE) // 2 // 256 * 256}-"]
    assert (tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == HELLASWAG_FILE
    again = tasks.load_tasks(("hellaswag",), 0, BYTES, "scratch", ONE_PROCESS)
    assert len(hellaswag_server.ranges) == 2 and again == first  # no request: read offline
    (task,) = first
    assert task.name == "hellaswag" and [item.label for item in task.items] == [3, 0, 2, 1, 0, 3]
    roof = task.items[0]  # ctx, then each ending after a space, as llm.c renders them
    assert BYTES.decode(roof.context) == "A man is sitting on a roof. he"
    assert BYTES.decode(roof.endings[3]) == " starts pulling up roofing on a roof."
    assert len(tasks.load_tasks(("hellaswag",), 4, BYTES, "scratch", ONE_PROCESS)[0].items) == 4


def test_a_damaged_hellaswag_file_is_named_with_its_line_and_how_to_fetch_it_again(hellaswag_server, tmp_path):
    tasks.HELLASWAG_PATH.parent.mkdir(parents=True)
    tasks.HELLASWAG_PATH.write_bytes(HELLASWAG_FILE[:-40])  # a last line cut short
    with pytest.raises(tasks.TaskError) as error:
        tasks.load_tasks(("hellaswag",), 0, BYTES, "scratch", ONE_PROCESS)
    message = str(error.value)
    assert message.startswith(f"{tasks.HELLASWAG_PATH}:6: not JSON") and "delete" in message and "\n" not in message
    assert hellaswag_server.ranges == []


@pytest.mark.parametrize("line, problem", [
    ('{"context": "Q", "endings": [" a", " b"]', "not JSON"),
    ('["Q", [" a", " b"], 0]', "not an object with context, endings and label"),
    ('{"question": "Q", "endings": [" a", " b"], "label": 0}', "not an object with context, endings and label"),
    ('{"context": "", "endings": [" a", " b"], "label": 0}', "context is '', not a non-empty text"),
    ('{"context": "Q", "endings": [" a"], "label": 0}', "endings is [' a'], not a list of two or more"),
    ('{"context": "Q", "endings": [" a", ""], "label": 0}', "endings is [' a', ''], not a list of two or more"),
    ('{"context": "Q", "endings": [" a", " b"], "label": 2}', "label is 2, not the index of one of its 2 endings"),
    ('{"context": "Q", "endings": [" a", " b"], "label": "0"}', "label is '0', not the index"),
], ids=["cut short", "a list", "no context", "empty context", "one ending", "empty ending", "label too large",
        "label as text"])
def test_a_malformed_item_is_one_line_naming_file_and_line(line, problem, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "Q", "endings": [" a", " b"], "label": 0}\n\n' + line + "\n")
    with pytest.raises(tasks.TaskError) as error:
        tasks.load_tasks((str(path),), 0, BYTES, "scratch", ONE_PROCESS)
    message = str(error.value)
    assert message.startswith(f"{path}:3: {problem}") and "\n" not in message
    assert message.endswith('expected {"context": text, "endings": [text, ...], "label": index of the right ending}')


def test_eval_tasks_names_hellaswag_or_existing_jsonl_files(tmp_path):
    mine = write_items(tmp_path / "mine.jsonl", [{"context": "Q", "endings": [" a", " b"], "label": 0}])
    assert tasks.tasks_problem(("hellaswag", str(mine))) is None
    assert "no-such.jsonl is neither" in tasks.tasks_problem(("hellaswag", "no-such.jsonl"))
    assert "hellaswg is neither" in tasks.tasks_problem(("hellaswg",))


def test_the_example_quiz_is_well_formed_and_its_labels_are_spread_over_the_endings():
    (task,) = tasks.load_tasks((str(ROOT / "config" / "python_quiz.jsonl"),), 0, BYTES, "scratch", ONE_PROCESS)
    assert task.name == "python_quiz" and len(task.items) == 30
    assert [sum(item.label == label for item in task.items) for label in range(4)] == [8, 8, 7, 7]


def test_a_hugging_face_folder_is_read_with_its_own_tokenizer(tiny_dataset, tmp_path):
    bpe = load_tokenizer(tiny_dataset)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "tokenizer.json").write_text(json.dumps(hf.tokenizer_json(bpe)))
    mine = write_items(tmp_path / "mine.jsonl", [{"context": "Kalo mine", "endings": [" sati", " ruvo"], "label": 1}])
    (task,) = tasks.load_tasks((str(mine),), 0, BYTES, f"hf:{tmp_path / 'gpt2'}", ONE_PROCESS)
    assert task.name == "mine"
    assert task.items[0].context == bpe.encode_ordinary("Kalo mine") != BYTES.encode("Kalo mine")


# ----------------------------------------------------------------------------- scoring
class Unigram(torch.nn.Module):
    """A hand-built model: whatever the context, the next byte is "a" (logit 0) or "b" (logit
    -1); every other byte has logit -30. Its loss on each ending is known exactly."""

    def __init__(self, block_size=64):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.logits = torch.full((257,), -30.0)
        self.logits[ord("a")], self.logits[ord("b")] = 0.0, -1.0

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1), None

    def loss(self, byte):
        return -torch.log_softmax(self.logits, dim=0)[ord(byte)].item()


def scored(items, tmp_path, model=None, runtime=ONE_PROCESS):
    (task,) = tasks.load_tasks((str(write_items(tmp_path / "quiz.jsonl", items)),), 0, BYTES, "scratch", runtime)
    return tasks.evaluate_tasks(model or Unigram(), [task], runtime)["quiz"]


def test_a_model_that_knows_the_answers_gets_all_right_and_shuffled_labels_the_expected_share(tmp_path):
    rng = random.Random(0)
    labels = [rng.randrange(4) for _ in range(40)]
    items = [{"context": f"question {index}?", "label": label,
              "endings": ["a" * 5 if ending == label else "z" * 5 for ending in range(4)]}
             for index, label in enumerate(labels)]
    assert scored(items, tmp_path) == {"acc": 1.0, "acc_norm": 1.0, "items": 40}
    shuffled = labels[:]
    rng.shuffle(shuffled)
    expected = sum(a == b for a, b in zip(labels, shuffled)) / len(labels)
    assert 0 < expected < 1
    for item, label in zip(items, shuffled):
        item["label"] = label
    assert scored(items, tmp_path) == {"acc": expected, "acc_norm": expected, "items": 40}


def test_acc_takes_the_summed_loss_and_acc_norm_the_mean_per_token(tmp_path):
    model = Unigram()
    # "aaaaaa": 6 likely bytes (0.31 nats each, 1.88 in all); "b": one less likely (1.31 nats)
    assert 6 * model.loss("a") > model.loss("b") > model.loss("a")
    (task,) = tasks.load_tasks((str(write_items(tmp_path / "quiz.jsonl", [
        {"context": "Q", "endings": ["aaaaaa", "b"], "label": 0}])),), 0, BYTES, "scratch", ONE_PROCESS)
    sums, means = tasks.ending_losses(model, tasks.rows_of(task.items[0], 64), ONE_PROCESS)
    assert sums == pytest.approx([6 * model.loss("a"), model.loss("b")], rel=1e-6)
    assert means == pytest.approx([model.loss("a"), model.loss("b")], rel=1e-6)
    assert tasks.evaluate_tasks(model, [task], ONE_PROCESS)["quiz"] == {"acc": 0.0, "acc_norm": 1.0, "items": 1}


def test_batches_and_padding_change_no_loss_and_long_contexts_are_cut_from_the_left(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32, block="gpt2")).eval()
    rng = random.Random(1)
    words = lambda count: " ".join(rng.choice(["ka", "lo", "mi", "ne", "ruvo"]) for _ in range(count))
    items = [{"context": words(rng.randint(1, 20)), "endings": [" " + words(rng.randint(1, 4)) for _ in range(4)],
              "label": rng.randrange(4)} for _ in range(10)]
    (task,) = tasks.load_tasks((str(write_items(tmp_path / "quiz.jsonl", items)),), 0, BYTES, "scratch", ONE_PROCESS)
    rows = [row for item in task.items for row in tasks.rows_of(item, 32)]
    assert max(len(tokens) for tokens, _ in rows) == 33  # contexts of up to 100 bytes, cut to 32 + 1
    assert all(tokens[-scored:] == ending for item in task.items for (tokens, scored), ending
               in zip(tasks.rows_of(item, 32), item.endings))
    together = tasks.ending_losses(model, rows, ONE_PROCESS)
    alone = [tasks.ending_losses(model, [row], ONE_PROCESS) for row in rows]
    assert together[0] == pytest.approx([sums[0] for sums, _ in alone], rel=1e-5)
    assert together[1] == pytest.approx([means[0] for _, means in alone], rel=1e-5)
    in_one_batch = tasks.evaluate_tasks(model, [task], ONE_PROCESS)
    monkeypatch.setattr(tasks, "BATCH_TOKENS", 1)  # one item a batch
    assert tasks.evaluate_tasks(model, [task], ONE_PROCESS) == in_one_batch


# ----------------------------------------------------------------------------- in train.py
def test_train_py_scores_tasks_at_each_evaluation_and_eval_only_scores_a_checkpoint(
        tiny_dataset, hellaswag_server, tmp_path, train_here):
    mine = write_items(tmp_path / "mine.jsonl", [{"context": "Kalo", "endings": [" mi", " sa", " ti"], "label": i % 3}
                                                 for i in range(5)])
    out_dir = tmp_path / "out"
    finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={out_dir}", "--max_iters=4", "--eval_interval=2",
                          f"--eval_tasks={mine}", "--sample_every_eval=false")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.count("  mine: acc_norm ") == 3
    evals = eval_lines(out_dir)
    assert [line["iter"] for line in evals] == [0, 2, 4]
    assert all(0 <= line["task/mine/acc_norm"] <= 1 and 0 <= line["task/mine/acc"] <= 1 for line in evals)
    svg = ElementTree.parse(out_dir / "curves.svg").getroot()
    (drawn,) = [path for path in svg.iter("{http://www.w3.org/2000/svg}path") if path.get("class") == "task"]
    assert drawn.get("data-task") == "mine"
    assert drawn.get("data-points") == " ".join(f"{line['tokens']!r},{line['task/mine/acc_norm']!r}" for line in evals)

    before = {path.name: path.stat().st_mtime_ns for path in out_dir.iterdir()}
    finished = train_here(f"--dataset={tiny_dataset}", f"--init_from={out_dir / 'best.pt'}", "--eval_only=True",
                          f"--eval_tasks=hellaswag,{mine}", "--eval_task_items=4")
    assert finished.returncode == 0, finished.stderr
    assert "  hellaswag: acc_norm " in finished.stdout and "(4 items)" in finished.stdout
    assert "  mine: acc_norm " in finished.stdout and len(hellaswag_server.ranges) == 1
    assert {path.name: path.stat().st_mtime_ns for path in out_dir.iterdir()} == before


def test_eval_only_scores_a_hugging_face_folder_with_its_tokenizer_as_the_model_itself_scores(
        tiny_dataset, tmp_path, train_here):
    torch.manual_seed(0)
    bpe = load_tokenizer(tiny_dataset)
    config = GPTConfig(vocab_size=bpe.n_vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, block="gpt2")
    model = GPT(config).eval()
    hf.write_hf_folder(tmp_path / "hf", {"model": model.state_dict(), "model_config": dataclasses.asdict(config)},
                         bpe, "a test model")
    rng = random.Random(3)
    mine = write_items(tmp_path / "mine.jsonl", [
        {"context": f"Kalo {rng.choice(['mi', 'sa'])}", "endings": [f" {rng.random()}" for _ in range(4)],
         "label": rng.randrange(4)} for _ in range(12)])
    finished = train_here(f"--dataset={tiny_dataset}", f"--init_from=hf:{tmp_path / 'hf'}", "--eval_only=True",
                          f"--eval_tasks={mine}")
    assert finished.returncode == 0, finished.stderr
    expected = tasks.evaluate_tasks(model, tasks.load_tasks((str(mine),), 0, bpe, "scratch", ONE_PROCESS), ONE_PROCESS)
    assert finished.stdout.rstrip("\n").endswith(tasks.tasks_line(expected))


# Under torchrun: rank 0 downloads HellaSwag while rank 1 waits; each scores every second item of
# a seeded tiny model's tasks; rank 0 then scores all of them alone and writes both results.
DDP_SCRIPT = """
import json, os, sys
from contextlib import nullcontext
from types import SimpleNamespace
import torch
sys.path.insert(0, {root!r})
import train
from model import GPT, GPTConfig
from owngpt import tasks
from owngpt.runtime import leave, setup_runtime
from owngpt.tokenizer import load_tokenizer

os.chdir({work!r})
tasks.HELLASWAG_URL = {url!r}
runtime = setup_runtime(train.read_config(["--device=cpu", "--gradient_accumulation_steps=2"]))
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32, block="gpt2"))
encoding = load_tokenizer(None, {{"kind": "byte", "vocab_size": 257, "eot_id": 256}})
loaded = tasks.load_tasks(("hellaswag", {mine!r}), 0, encoding, "scratch", runtime)
shared = tasks.evaluate_tasks(model, loaded, runtime)
if runtime.is_main:
    alone = tasks.evaluate_tasks(model, loaded, SimpleNamespace(rank=0, world_size=1, device=runtime.device,
                                                                autocast=nullcontext()))
    with open({result!r}, "w") as file:
        json.dump({{"shared": shared, "alone": alone}}, file)
leave(None)
"""


@pytest.mark.slow
def test_two_processes_count_what_one_process_counts(hellaswag_server, tmp_path):
    rng = random.Random(2)
    mine = write_items(tmp_path / "mine.jsonl", [
        {"context": f"Kalo {rng.random()}", "endings": [f" {rng.random()}" for _ in range(3)],
         "label": rng.randrange(3)} for _ in range(7)])  # 4 items on rank 0, 3 on rank 1
    script, result = tmp_path / "score.py", tmp_path / "result.json"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), work=str(tmp_path), url=tasks.HELLASWAG_URL, mine=str(mine),
                                        result=str(result)))
    finished = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, timeout=180, env=ONE_THREAD)
    assert finished.returncode == 0, finished.stderr
    outcome = json.loads(result.read_text())
    assert outcome["shared"] == outcome["alone"]
    assert outcome["shared"]["hellaswag"]["items"] == 6 and outcome["shared"]["mine"]["items"] == 7
    assert len(hellaswag_server.ranges) == 1  # one download, by rank 0
