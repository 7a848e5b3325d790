"""Multiple-choice evaluation as papers and leaderboards report it: HellaSwag, and questions of your own.

    python train.py --init_from=out/demo/best.pt --eval_only=True --eval_tasks=hellaswag,config/python_quiz.jsonl
    python train.py config/train_demo.py --eval_tasks=hellaswag --eval_task_items=500   # at each evaluation

An item is a context and a few endings, one of them right. A file of your own holds one a line:

    {"context": "The capital of France is", "endings": [" Paris", " Rome", " a cat"], "label": 0}

The model reads context + ending exactly as written: end the context without a space and start
each ending with one where a word follows, as the text would be tokenised. A chat model's items
ask in its format: "messages" (a conversation ending with the user's, owngpt/chat.py) in place of
"context"; each ending is then an answer, scored with the <|end|> that closes it. Each ending is scored
by the model's losses on its own tokens given the context, the way of llm.c's reference
(karpathy/llm.c, dev/data/hellaswag.py): no end-of-text before the context, the ending's tokens
encoded on their own. Two accuracies, the share of items whose right ending has the lowest
- acc: summed loss (minus the ending's log-probability), which favours short endings;
- acc_norm: mean loss per token, as llm.c computes its acc_norm, with which GPT-2 small (124M)
  scores 29.55% on HellaSwag's 10,042 validation items (its docstring). We report this one
  because that is the figure people compare a GPT-2-sized run with. EleutherAI's
  lm-evaluation-harness divides the log-probability by the ending's length in characters
  instead (lm_eval/api/task.py: lls / completion_len) and gets 31.14% for the same model: the
  two acc_norm figures are not comparable. Chance is 1 / the number of endings: 25% for 4.

`hellaswag` is the official validation set (rowanz/hellaswag, data/hellaswag_val.jsonl, ctx and
endings joined with a space as llm.c does), downloaded once into data/hellaswag/ by the same
download code as prepare.py's (it retries and resumes), every line checked, and read offline
after. A context longer than the model's block_size is cut from the left. Under DDP each
process scores every world_size-th item and the counts are summed.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from owngpt.chat import chat_token_ids, message_problem, render_prompt
from owngpt.flags import UserError
from owngpt.hf import HF_PREFIX, read_tokenizer_json
from owngpt.parallel import gathered
from owngpt.web.crawl import download

HELLASWAG = "hellaswag"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_PATH = Path("data") / "hellaswag" / "hellaswag_val.jsonl"  # relative, like dataset names: data/<name>
# A batch holds whole items up to this many (padded) tokens: the logits of 4096 tokens of GPT-2's
# 50,257-token vocabulary take 0.8 GB in float32, and an item of long rows still goes alone.
BATCH_TOKENS = 4096
YOUR_FORMAT = '{"context": text, "endings": [text, ...], "label": index of the right ending}'


class TaskError(UserError):
    """A task that cannot be read: one line naming the file and line."""


@dataclass
class Item:
    context: list  # token ids
    endings: list  # token ids of each ending
    label: int  # index of the right ending


@dataclass
class Task:
    name: str  # hellaswag, or a file's name without .jsonl: the key of its figures
    items: list


def tasks_problem(names):
    """What eval_tasks may hold (a flags check: None when valid)."""
    wrong = [name for name in names if name != HELLASWAG and not (name.endswith(".jsonl") and Path(name).is_file())]
    return f"{HELLASWAG} or paths of .jsonl files of items {YOUR_FORMAT} ({', '.join(wrong)} is neither)" \
        if wrong else None


def load_tasks(names, max_items, encoding, init_from, runtime):
    """The tasks named, tokenised, each cut to its first max_items items (0: all). A Hugging Face
    folder (init_from=hf:FOLDER) is read with its own tokenizer.json where it has one. Rank 0
    downloads HellaSwag while the others wait."""
    folder = Path(init_from.removeprefix(HF_PREFIX))
    if init_from.startswith(HF_PREFIX) and (folder / "tokenizer.json").is_file():
        encoding = read_tokenizer_json(folder)
    if HELLASWAG in names and runtime.is_main and not HELLASWAG_PATH.is_file():
        print(f"downloading {HELLASWAG_URL} into {HELLASWAG_PATH}", flush=True)
        HELLASWAG_PATH.parent.mkdir(parents=True, exist_ok=True)
        download(HELLASWAG_URL, HELLASWAG_PATH)
    if HELLASWAG in names and runtime.world_size > 1:
        dist.barrier()
        if not HELLASWAG_PATH.is_file():  # another machine's rank 0 downloaded it, onto its own disk
            raise TaskError(f"{HELLASWAG_PATH} is not on this machine: share data/ between the machines, or copy it")
    tasks = []
    for name in names:
        path = HELLASWAG_PATH if name == HELLASWAG else Path(name)
        items = read_items(path, name == HELLASWAG)
        items = items[:max_items] if max_items else items
        tasks.append(Task(name if name == HELLASWAG else path.stem, [tokenised(item, encoding) for item in items]))
    return tasks


def read_items(path, hellaswag):
    """[(context, endings, label)] of a jsonl file; TaskError naming the line of a malformed item."""
    context_key, expected = ("ctx", "HellaSwag's format") if hellaswag else ("context", YOUR_FORMAT)
    damaged = f" (delete {path} to download it again)" if hellaswag else ""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise TaskError(f"{path} is not UTF-8 text: {error}{damaged}") from None
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            problem = item_problem(item, context_key)
        except ValueError as error:
            problem = f"not JSON: {error}"
        if problem:
            raise TaskError(f"{path}:{number}: {problem}; expected {expected}{damaged}")
        endings = [" " + ending for ending in item["endings"]] if hellaswag else item["endings"]
        items.append((item.get("messages") or item[context_key], endings, item["label"]))
    if not items:
        raise TaskError(f"{path} holds no items; expected one a line: {expected}")
    return items


def item_problem(item, context_key):
    """What is wrong with one parsed line, or None."""
    if isinstance(item, dict) and "messages" in item and context_key == "context":  # a question in chat form
        problem = message_problem(item["messages"] + [{"role": "assistant", "content": "an answer"}])
        if problem:
            return f"messages: {problem}"
        context_key = "messages"
    if not isinstance(item, dict) or not {context_key, "endings", "label"} <= item.keys():
        return f"not an object with {context_key}, endings and label"
    context, endings, label = item[context_key], item["endings"], item["label"]
    if context_key != "messages" and (not isinstance(context, str) or not context):
        return f"{context_key} is {context!r}, not a non-empty text"
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        return f"endings is {endings!r}, not a list of two or more non-empty texts"
    if type(label) is not int or not 0 <= label < len(endings):
        return f"label is {label!r}, not the index of one of its {len(endings)} endings"
    return None


def tokenised(item, encoding):
    context, endings, label = item
    if isinstance(context, list):  # messages: the prompt the model answers, each answer closed by <|end|>
        end = chat_token_ids(encoding)["end"]
        return Item(render_prompt(context, encoding), [encoding.encode_ordinary(ending) + [end] for ending in endings],
                    label)
    return Item(encoding.encode_ordinary(context), [encoding.encode_ordinary(ending) for ending in endings], label)


# ----------------------------------------------------------------------------- scoring
def evaluate_tasks(model, tasks, runtime):
    """{name: {"acc", "acc_norm", "items"}} for each task; every rank calls it (one all-reduce)."""
    if not tasks:
        return {}
    was_training = model.training
    model.eval()
    with gathered(model):  # FSDP: the whole weights on every rank, which may score different numbers of items
        counts = torch.tensor([count_right(model, task.items[runtime.rank::runtime.world_size], runtime)
                               for task in tasks], dtype=torch.int64, device=runtime.device)
    model.train(was_training)
    if runtime.world_size > 1:
        dist.all_reduce(counts)
    return {task.name: {"acc": right / items, "acc_norm": right_norm / items, "items": items}
            for task, (items, right, right_norm) in zip(tasks, counts.tolist())}


def count_right(model, items, runtime):
    """[items, right by summed loss, right by mean loss per token] over items."""
    counts = [0, 0, 0]
    for batch in batches(items, model.config.block_size):
        rows = [row for item in batch for row in rows_of(item, model.config.block_size)]
        sums, means = ending_losses(model, rows, runtime)
        first = 0
        for item in batch:
            endings = range(first, first + len(item.endings))
            counts[0] += 1
            counts[1] += int(min(endings, key=sums.__getitem__) - first == item.label)
            counts[2] += int(min(endings, key=means.__getitem__) - first == item.label)
            first += len(item.endings)
    return counts


def rows_of(item, block_size):
    """(tokens, scored) per ending: context then ending, the last block_size + 1 tokens (the
    inputs and the targets, shifted by one); the last `scored` of them are the ending's."""
    rows = []
    for ending in item.endings:
        tokens = (item.context + ending)[-(block_size + 1):]
        rows.append((tokens, min(len(ending), len(tokens) - 1)))
    return rows


def batches(items, block_size):
    """Runs of whole items whose rows, padded to the longest, hold at most BATCH_TOKENS tokens."""
    batch, rows, longest = [], 0, 0
    for item in items:
        item_longest = min(max(len(item.context) + len(ending) for ending in item.endings), block_size + 1)
        if batch and (rows + len(item.endings)) * max(longest, item_longest) > BATCH_TOKENS:
            yield batch
            batch, rows, longest = [], 0, 0
        batch.append(item)
        rows, longest = rows + len(item.endings), max(longest, item_longest)
    if batch:
        yield batch


@torch.no_grad()
def ending_losses(model, rows, runtime):
    """The summed and the mean loss (nats) of each row's scored tokens: two lists. Rows are padded
    on the right, which the causal attention of the tokens before cannot see."""
    length = max(len(tokens) for tokens, _ in rows) - 1
    inputs = torch.zeros((len(rows), length), dtype=torch.int64)
    targets = torch.full((len(rows), length), -1, dtype=torch.int64)  # -1: context and padding, not scored
    for row, (tokens, scored) in enumerate(rows):
        inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        targets[row, len(tokens) - 1 - scored:len(tokens) - 1] = torch.tensor(tokens[-scored:])
    inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
    with runtime.autocast:
        logits, _ = model(inputs)
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    sums = losses.view_as(targets).sum(dim=1)
    return sums.tolist(), (sums / (targets != -1).sum(dim=1)).tolist()


def tasks_line(results):
    """A second line for the evaluation's log line: each task's acc_norm and acc ("" without tasks)."""
    return "".join(f"\n  {name}: acc_norm {result['acc_norm']:.1%}, acc {result['acc']:.1%} ({result['items']:,} items)"
                   for name, result in results.items())


def task_metrics(results):
    """metrics.jsonl's keys: task/<name>/acc and task/<name>/acc_norm."""
    return {f"task/{name}/{key}": result[key] for name, result in results.items() for key in ("acc", "acc_norm")}
