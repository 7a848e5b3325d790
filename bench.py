"""bench.py: measure a part of owngpt on this machine, the same way every time.

    python bench.py --what=recipes                # training recipes at equal wall time on data/python
    python bench.py --what=recipes --budget=270 --recipes=gpt2,modern --seeds=2
    python bench.py --what=throughput --shape=nanogpt --dataset=python_byte   # tokens/s at nanoGPT's CPU example shape
    python bench.py --what=throughput --shape=nanogpt --dataset=python_byte --recipes=gpt2 --nanogpt=../nanoGPT  # beside it
    python bench.py --what=throughput --device=cuda --shape=config/train_gpt2_124m.py   # a GPU: tokens/s, MFU
    python bench.py --what=throughput --shape=config/train_demo.py --against=../before   # a change, before and after
    python bench.py --what=step --seeds=3 --profile=true   # the quick start's step alone, per matmul path, profiled
    python bench.py --what=recipes --device=cuda --shape=config/train_gpt2_124m.py --recipes=modern_124m,gpt2_124m \
        --seeds=1 --budget=120   # the GPU check: both recipes at GPT-2 small's shape, compiled, ~7 minutes
    python bench.py --what=webfilters --mb=50     # the web filters on one core, 50 MB of text
    python bench.py --what=small_text --nanogpt=../nanoGPT   # your own small text: ours against nanoGPT's char model
    python bench.py --what=small_text --vocab_sizes=512,2048 --budget=150   # the vocabulary rule's measurement
    python bench.py --what=prepare --mb=50        # prepare.py on a 50 MB WET file from a fake crawl
    python bench.py --what=prepare --mb=20 --profile=true   # the same in one process, under cProfile
    python bench.py --what=chat --dataset=stdlib_chat --seeds=2   # the chat demo: base against fine-tuned
    python bench.py --what=serve --model=out/chat  # chat.py --serve: tokens/s and first tokens, 1 and 16 clients
    python bench.py --help                        # every flag with its default

Each measurement is a mode: a function of the settings, listed in MODES by its --what name.
Training runs are separate `python train.py` processes, run in turn (A B A B: seed 1 of every
recipe, then seed 2, ...) so that a machine that slows down for a while hurts every recipe
alike; the table gives each run, the medians, and each recipe's ratio to the first one.
With --nanogpt, throughput runs nanoGPT's own train.py (its CPU example) first in each
round, on the same text, and the ratios are to it. With --against, other checkouts of owngpt
(`git worktree add ../before HEAD~1`) run each recipe first, the same way: before and after a change.
"""
import functools
import gzip
import http.client
import http.server
import json
import math
import pickle
import pstats
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

import torch

from owngpt import flags, stdlib_chat
from owngpt.chat import reply
from owngpt.dataset import SPLITS, open_folder, read_meta, read_split
from owngpt.filtered import split_of
from owngpt.inference import load_trained
from owngpt.web import filters


# ----------------------------------------------------------------------------- webfilters

FUNCTION_WORDS = ("the of and to in is that for it with as was on be by at this are from "
                  "or have an they which one you were her all she there would their we "
                  "him been has when who will more no if out so said what up its about "
                  "into than them can only other new some could time these two may then").split()
CONTENT_WORDS = ("river city people water system history music family government school "
                 "market winter garden language story village country morning teacher "
                 "doctor science station island forest animal student company problem "
                 "building summer picture report window mountain kitchen library journey "
                 "season travel program research engine harbor farmer bridge "
                 "painting century evening answer quickly carefully important different "
                 "small large early ancient modern simple public local general possible "
                 "written found known built opened moved changed started followed "
                 "wanted reached carried believed remembered explained").split()


def english_like_documents(megabytes, seed=0):
    """Random pages of English-looking prose that pass every filter, so a benchmark runs
    every rule in full: sentences of function and content words, several per line, lines
    grouped in paragraphs."""
    rng = random.Random(seed)
    documents, size = [], 0
    while size < megabytes * 1_000_000:
        paragraphs = []
        for _ in range(rng.randint(3, 8)):
            lines = []
            for _ in range(rng.randint(1, 4)):
                sentences = []
                for _ in range(rng.randint(2, 5)):
                    words = [rng.choice(FUNCTION_WORDS) if rng.random() < 0.45
                             else rng.choice(CONTENT_WORDS) for _ in range(rng.randint(8, 20))]
                    sentences.append(" ".join(words).capitalize() + ".")
                lines.append(" ".join(sentences))
            paragraphs.append("\n".join(lines))
        documents.append("\n\n".join(paragraphs))
        size += len(documents[-1].encode())
    return documents


def bench_webfilters(settings):
    """Documents/s and MB/s of filters.filter_document plus dedup_signature on --mb
    megabytes of english_like_documents, in CPU seconds of this process."""
    documents = english_like_documents(settings["mb"])
    headers = {filters.LANGUAGE_HEADER: "eng"}
    deduplicator = filters.Deduplicator()
    filter_seconds = signature_seconds = 0.0
    kept = 0
    for document in documents:
        start = time.process_time()
        text, reason = filters.filter_document(document, headers)
        filter_seconds += time.process_time() - start
        if text is None:
            continue
        start = time.process_time()
        signature = filters.dedup_signature(text)
        signature_seconds += time.process_time() - start
        kept += deduplicator.check(signature) is None
    total_mb = sum(len(d.encode()) for d in documents) / 1e6
    seconds = filter_seconds + signature_seconds
    print(f"{len(documents)} documents, {total_mb:.1f} MB, {kept} kept, one core: "
          f"{len(documents) / seconds:.0f} documents/s, {total_mb / seconds:.2f} MB/s "
          f"(filters {filter_seconds:.1f} s, MinHash signatures {signature_seconds:.1f} s)")


# ----------------------------------------------------------------------------- prepare

BENCH_CRAWL = "CC-MAIN-2099-50"


def wet_record(number, page, language="eng"):
    """One conversion record, gzipped on its own as Common Crawl writes them."""
    body = page.encode()
    headers = (f"WARC/1.0\r\nWARC-Type: conversion\r\nWARC-Target-URI: https://site{number % 5000}.example.org/"
               f"{number}\r\nWARC-Date: 2099-01-01T00:00:00Z\r\nWARC-Record-ID: <urn:uuid:{number:012d}>\r\n"
               f"WARC-Identified-Content-Language: {language}\r\nContent-Type: text/plain\r\n"
               f"Content-Length: {len(body)}\r\n\r\n")
    return gzip.compress(headers.encode() + body + b"\r\n\r\n", compresslevel=1)


def web_like_pages(megabytes, seed=0):
    """(page, language) pairs of about this many MB: mostly english_like_documents, and,
    so that every filter has work, 1 in 10 a short page, 1 in 20 each a page in another
    language, a spam page of one repeated line, an exact copy and a near copy (one word
    changed) of an earlier page."""
    rng = random.Random(seed)
    pages = []
    for page in english_like_documents(megabytes, seed):
        roll = rng.random()
        if roll < 0.10:
            page = " ".join(page.split()[:30])
        elif roll < 0.15:
            pages.append((page, "deu"))
            continue
        elif roll < 0.20:
            page = "\n".join([page.split("\n")[0]] * 20)
        elif roll < 0.25 and pages:
            page = rng.choice(pages)[0]
        elif roll < 0.30 and pages:
            words = rng.choice(pages)[0].split(" ")
            words[len(words) // 2] = "different"
            page = " ".join(words)
        pages.append((page, "eng"))
    return pages


def fake_crawl(folder, megabytes):
    """A crawl of one WET file of about this many MB of text in folder, as Common Crawl
    lays it out (collinfo.json, crawl-data/<crawl>/wet.paths.gz, the WET file); made once."""
    wet_path = f"crawl-data/{BENCH_CRAWL}/segments/0/wet/bench-{megabytes:g}mb.warc.wet.gz"
    if not (folder / wet_path).exists():
        (folder / wet_path).parent.mkdir(parents=True, exist_ok=True)
        pages = web_like_pages(megabytes)
        records = b"".join(wet_record(number, page, language) for number, (page, language) in enumerate(pages))
        (folder / wet_path).write_bytes(records)
    (folder / "collinfo.json").write_text(json.dumps([{"id": BENCH_CRAWL}]))
    (folder / f"crawl-data/{BENCH_CRAWL}/wet.paths.gz").write_bytes(gzip.compress(wet_path.encode() + b"\n"))
    return wet_path


def bench_prepare(settings):
    """The whole single-machine pipeline, `prepare.py --source=commoncrawl` (read, filter,
    merge and dedup, BPE, tokenize, write), on one WET file of --mb MB of web-like text
    served on 127.0.0.1: MB/s of WET text read, and the seconds of each stage. With
    --profile=true it runs in one process under cProfile and prints the top functions."""
    out_dir = Path(settings["out_dir"])
    crawl_folder = out_dir / "fake_crawl"
    fake_crawl(crawl_folder, settings["mb"])
    handler = functools.partial(QuietFiles, directory=str(crawl_folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    prepare_flags = ["--source=commoncrawl", f"--crawl={BENCH_CRAWL}", f"--cc_base_url={url}",
             f"--cc_index_url={url}collinfo.json", f"--out_dir={out_dir / 'web'}"]
    profile = out_dir / "prepare.prof"
    shutil.rmtree(out_dir / ".web.partial", ignore_errors=True)  # parts a failed run left would be reused
    command = [sys.executable, *(["-m", "cProfile", "-o", str(profile)] if settings["profile"] else []), "prepare.py",
               *prepare_flags, *(["--num_workers=1"] if settings["profile"] else [])]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    server.shutdown()
    if finished.returncode != 0:
        raise flags.UserError(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
    meta = json.loads((out_dir / "web" / "meta.json").read_text())
    megabytes = meta["documents"]["bytes_read"] / 1e6
    print(f"{megabytes:.1f} MB of WET text, {meta['documents']['read']:,} documents, {meta['documents']['kept']:,} "
          f"kept, {meta['settings']['num_workers']} worker(s): {seconds:.1f} s, {megabytes / seconds:.2f} MB/s "
          f"(the process's wall time, Python's start included)")
    print("stages (s): " + ", ".join(f"{stage} {value:.1f}" for stage, value in meta["timings_s"].items()))
    task_rate = meta["throughput"]["filter"]["mb_per_s"]  # stage one alone: what a cluster's task does
    print(f"stage one (a task's work): {task_rate:.2f} MB/s, {task_rate * 3600 / 1000:.1f} GB of WET text per task-hour")
    if settings["profile"]:
        pstats.Stats(str(profile)).sort_stats("tottime").print_stats(15)


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# ----------------------------------------------------------------------------- training recipes

# The recipes, as train.py flags over the shape's config file. Each block trains at the rates
# tuned for it at the quick start's shape, read from the config files that hold them: the
# modern block's from config/train_demo.py, GPT-2's from config/train_demo_gpt2.py (which runs
# after it). gpt2 is GPT-2's 2019 recipe, modern the winning one, and the others take one piece
# away from it (RESULTS.md: What each piece bought at 90 s).
CONFIG = Path(__file__).resolve().parent / "config"
DEMO = flags.config_file_values(CONFIG / "train_demo.py")
RATES = {"modern": DEMO, "gpt2": {**DEMO, **flags.config_file_values(CONFIG / "train_demo_gpt2.py")}}


def recipe(block="modern", optimizer="muon", lr_schedule="wsd", value_embeddings=None):
    """train.py flags for a recipe: each block at the rates tuned for it; value embeddings
    with the modern block unless said otherwise."""
    value_embeddings = block == "modern" if value_embeddings is None else value_embeddings
    rates = ["learning_rate", "min_lr", *(["muon_lr"] if optimizer == "muon" else [])]
    return [f"--block={block}", f"--value_embeddings={str(value_embeddings).lower()}", f"--optimizer={optimizer}",
            f"--lr_schedule={lr_schedule}", *(f"--{key}={RATES[block][key]}" for key in rates)]


RECIPES = {
    "gpt2": recipe("gpt2", "adamw", "cosine"),
    "modern": recipe(),
    "modern_no_value_embeddings": recipe(value_embeddings=False),
    "modern_adamw": recipe(optimizer="adamw"),
    "modern_cosine": recipe(lr_schedule="cosine"),
    "gpt2_muon": recipe("gpt2"),
    # at GPT-2 small's shape, each with its own config's rates: --shape=config/train_gpt2_124m.py
    "modern_124m": [],
    "gpt2_124m": [str(CONFIG / "train_gpt2_124m_2019.py")],
}


def recipe_list(names):
    unknown = [name for name in names if name not in RECIPES]
    return f"recipes among {', '.join(RECIPES)}" if unknown else None


def train_run(settings, name, seed, arguments, checkout="."):
    """One `python train.py` run with these arguments, of this checkout of owngpt (run here, on
    this folder's data); returns its evaluations (the last with the peak memory) and its logged steps."""
    out_dir = Path(settings["out_dir"]) / f"{name}_seed{seed}"
    shutil.rmtree(out_dir, ignore_errors=True)  # this run's folder from an earlier bench: train.py would refuse it
    command = [sys.executable, str(Path(checkout) / "train.py"), *settings["shape"].split(","),
               f"--dataset={settings['dataset']}",
               f"--out_dir={out_dir}", f"--seed={seed}", f"--device={settings['device']}", "--log_interval=10",
               *arguments]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise flags.UserError(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
    (out_dir / "stdout.txt").write_text(finished.stdout)  # what the run said, for the record
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "tokens_per_s" in line]
    peak = re.search(r"peak memory ([\d.]+) GiB", finished.stdout)  # train.py's last line
    evaluations = [line for line in lines if "val_bpb" in line]
    evaluations[-1]["peak_gib"] = float(peak[1]) if peak else 0.0
    return evaluations, steps


def compare(settings, runs):
    """Every run once per seed, in turn; runs maps a name to run(seed) -> {column: value}."""
    names, table = list(runs), {}
    for seed in range(1, settings["seeds"] + 1):
        for name in names:
            row = runs[name](seed)
            table.setdefault(name, []).append(row)
            print(f"{name:>14} seed {seed}: " + " | ".join(f"{key} {value:,.4g}" for key, value in row.items()),
                  flush=True)
    print(f"\nmedians over {settings['seeds']} seed(s), and the ratio to {names[0]}:")
    first = {key: statistics.median(row[key] for row in table[names[0]]) for key in table[names[0]][0]}
    for name in names:
        medians = {key: statistics.median(row[key] for row in table[name]) for key in first}
        print(f"{name:>14}: " + " | ".join(f"{key} {value:,.4g} ({value / first[key]:.3f}x)"
                                           for key, value in medians.items()))


def recipe_runs(settings, extra, measure):
    """compare's runs for the recipes: train.py with extra flags, measure(last evaluation, steps) -> row;
    each recipe first by the --against checkouts (named recipe@folder), then by this one."""
    def run(recipe, checkout, seed):
        name = recipe if checkout == "." else f"{recipe}@{Path(checkout).name}"
        evaluations, steps = train_run(settings, name, seed, [*RECIPES[recipe], *extra], checkout)
        return measure(evaluations[-1], steps)
    return {recipe if checkout == "." else f"{recipe}@{Path(checkout).name}": functools.partial(run, recipe, checkout)
            for recipe in settings["recipes"] for checkout in (*settings["against"], ".")}


def bench_recipes(settings):
    """Each recipe trains for --budget seconds of wall time (train.py's max_time); compares
    the steps it took, its tokens/s and its final val loss in bits per byte."""
    extra = [f"--max_time={settings['budget']}", "--eval_interval=100000", f"--eval_iters={settings['eval_iters']}"]
    def measure(evaluation, steps):
        timed = steps[1:] or steps  # the first log line holds the first steps (allocation, compilation)
        row = {"steps": evaluation["iter"], "tokens/s": statistics.median(line["tokens_per_s"] for line in timed),
               "val bits/byte": evaluation["val_bpb"], "peak GiB": evaluation["peak_gib"]}
        if "mfu" in timed[0]:  # a GPU train.py knows
            row["MFU %"] = 100 * statistics.median(line["mfu"] for line in timed)
        return row
    compare(settings, recipe_runs(settings, extra, measure))


# nanoGPT's CPU example (its README: shakespeare_char on a MacBook): 4 layers of 128, 4 heads,
# context 64, batch 12, no dropout; on data/python_byte (prepare.py --tokenizer=byte).
NANOGPT_CPU_SHAPE = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12",
                     "--dropout=0.0", "--warmup_iters=10"]


def bench_throughput(settings):
    """Training tokens/s (and MFU on a GPU train.py knows) over --iters iterations at --shape's
    config, or at nanoGPT's CPU shape (--shape=nanogpt, over the quick start's config)."""
    shape = []
    if settings["shape"] == "nanogpt":
        settings, shape = {**settings, "shape": DEFAULTS["shape"]}, NANOGPT_CPU_SHAPE
    extra = [*shape, f"--max_iters={settings['iters']}", "--max_time=0", "--eval_interval=100000", "--eval_iters=1"]
    if settings["device"] == "cuda":
        extra += ["--compile=True", "--dtype=bfloat16"]

    def measure(evaluation, steps):
        timed = steps[1:] or steps  # the first log line holds the first steps (allocation, compilation)
        row = {"tokens/s": statistics.median(line["tokens_per_s"] for line in timed)}
        if "mfu" in timed[0]:
            row["MFU %"] = 100 * statistics.median(line["mfu"] for line in timed)
        return row
    nanogpt = {"nanogpt": nanogpt_runner(settings)} if settings["nanogpt"] else {}
    compare(settings, {**nanogpt, **recipe_runs(settings, extra, measure)})


STEP_PATHS = ("mkl", "onednn", "auto", "compiled", "bfloat16")


def bench_step(settings):
    """The training step of --shape's config in this process, timed apart from train.py's loop:
    forward, backward and the optimizer's step, each a median over --iters steps, for every way
    a CPU can multiply (MKL, oneDNN, the choice owngpt/cpu.py times, torch.compile, and bfloat16
    autocast, train.py --dtype=bfloat16), in turn
    for --seeds rounds. Random token ids of --dataset's vocabulary (the speed does not depend on
    the text); --profile=true adds torch.profiler's table of each path's operators (first round)."""
    import dataclasses
    from model import GPT, GPTConfig
    from owngpt import cpu
    from owngpt.optimizers import build_optimizer
    from owngpt.runtime import keep_freed_memory
    if settings["device"] != "cpu":
        raise flags.UserError("--what=step times a CPU's step: --device=cpu")
    keep_freed_memory()  # as train.py does on a CPU: else every step's logits are faulted in anew
    train_script = Path(__file__).resolve().parent / "train.py"  # its defaults read, not imported, as plan.py does
    cfg = SimpleNamespace(**flags.parse([settings["shape"]], flags.defaults_of(train_script),
                                        flags.comments_of(train_script), {}, program="bench.py", config_files=True))
    model_keys = [field.name for field in dataclasses.fields(GPTConfig) if field.name != "vocab_size"]
    vocab_size = read_meta(open_folder(settings["dataset"]))["tokenizer"]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=generator)
               for _ in range(8)]

    def run(path, seed):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{key: getattr(cfg, key) for key in model_keys}, vocab_size=vocab_size))
        started = time.perf_counter()
        choice = cpu.choose_matmuls(model, cfg.batch_size * cfg.block_size) if path == "auto" else path
        choosing = time.perf_counter() - started
        cpu.use_matmuls(model, choice if path in ("mkl", "onednn", "auto") else "mkl")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "bfloat16")
        forward = torch.compile(model) if path == "compiled" else model
        optimizer = build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.muon_lr, cfg.weight_decay,
                                    (cfg.beta1, cfg.beta2), "cpu", cfg.embedding_lr)

        def step(index, times=None):
            tokens = batches[index % len(batches)]
            began = time.perf_counter()
            with autocast:
                _, loss = forward(tokens[:, :-1], tokens[:, 1:])
            forwarded = time.perf_counter()
            loss.backward()
            backwarded = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if times is not None:
                times.append((forwarded - began, backwarded - forwarded, time.perf_counter() - backwarded))
        started = time.perf_counter()
        step(0)
        first = time.perf_counter() - started
        for index in range(1, 4):
            step(index)
        times = []
        for index in range(settings["iters"]):
            step(index, times)
        parts = [statistics.median(part) * 1000 for part in zip(*times)]
        if settings["profile"] and seed == 1:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                for index in range(10):
                    step(index)
            print(f"{path}, 10 steps:\n" + profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=15, max_name_column_width=45))
        row = {"ms/step": sum(parts), "forward ms": parts[0], "backward ms": parts[1], "optimizer ms": parts[2],
               "tokens/s": cfg.batch_size * cfg.block_size * 1000 / sum(parts), "first step s": first}
        return {**row, "choosing s": choosing} if path == "auto" else row  # printed per round, not compared
    paths = STEP_PATHS if cpu.onednn_available() else ("mkl", "compiled", "bfloat16")
    compare(settings, {path: functools.partial(run, path) for path in paths})


def nanogpt_dataset(folder, dataset):
    """Our dataset's text in nanoGPT's character-level format (train.bin and val.bin of uint16
    ids, meta.pkl with vocab_size, as small_text_datasets writes them) in folder/data/<name>:
    each distinct token is a character, so byte data becomes its text's characters. Returns
    the name."""
    source = open_folder(dataset)
    meta = read_meta(source)
    splits = {split: np.concatenate(read_split(source, meta, split)) for split in SPLITS}
    alphabet = np.unique(np.concatenate(list(splits.values())))
    name = source.resolve().name
    out = folder / "data" / name
    out.mkdir(parents=True, exist_ok=True)
    for split, tokens in splits.items():
        np.searchsorted(alphabet, tokens).astype(np.uint16).tofile(out / f"{split}.bin")
    (out / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(alphabet)}))
    return name


def nanogpt_runner(settings):
    """run(seed) for compare: nanoGPT's CPU example for --iters iterations on --dataset's text;
    tokens/s from the median of its per-iteration times (iteration 0, which evaluates, left
    out). nanoGPT has no seed flag: its runs differ only in the machine's noise."""
    folder = Path(settings["out_dir"]).resolve() / "nanogpt"
    dataset = nanogpt_dataset(folder, settings["dataset"])
    tokens_per_iter = 12 * 64  # NANOGPT_CPU_EXAMPLE's batch_size x block_size

    def run(seed):
        said = nanogpt_train(settings["nanogpt"], folder, dataset,
                             [f"--max_iters={settings['iters']}", f"--out_dir={folder / f'seed{seed}'}"])
        ms = [float(time_ms) for time_ms in re.findall(r"^iter \d+: .*time ([\d.]+)ms", said, re.M)]
        return {"tokens/s": tokens_per_iter * 1000 / statistics.median(ms[1:])}
    return run


# ----------------------------------------------------------------------------- own small text

# nanoGPT's README example for a CPU (its shakespeare_char config at a laptop's size), which
# trains a character model in ~2 minutes
NANOGPT_CPU_EXAMPLE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                       "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                       "--lr_decay_iters=2000", "--dropout=0.0"]


def small_text_datasets(settings, folder):
    """The text's first 90% for train and the rest for val, prepared as prepare.py does by
    default (and at each --vocab_sizes), and as nanoGPT's characters (train.bin, val.bin,
    meta.pkl: uint16 ids of the sorted set of characters, as its shakespeare_char/prepare.py
    writes them). Returns {vocab label: dataset folder}, the characters' folder, and val's
    bytes per character."""
    text = Path(settings["text"]).read_text(encoding="utf-8") if settings["text"] else pydoc_topics_text()
    cut = int(len(text) * 0.9)
    splits = {"train": text[:cut], "val": text[cut:]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        (folder / f"{split}.txt").write_text(part, encoding="utf-8")
    datasets = {}
    for vocab_size in ("default", *settings["vocab_sizes"]):
        out = folder / f"vocab_{vocab_size}"
        command = [sys.executable, "prepare.py", "--source=files", f"--input={folder / 'train.txt'}",
                   f"--val_input={folder / 'val.txt'}", f"--out_dir={out}",
                   *([] if vocab_size == "default" else [f"--vocab_size={vocab_size}"])]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise flags.UserError(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
        datasets[vocab_size] = out
    chars = folder / "chars"
    (chars / "data" / "text").mkdir(parents=True, exist_ok=True)
    alphabet = sorted(set(text))
    ids = {char: i for i, char in enumerate(alphabet)}
    for split, part in splits.items():
        np.array([ids[char] for char in part], dtype=np.uint16).tofile(chars / "data" / "text" / f"{split}.bin")
    with open(chars / "data" / "text" / "meta.pkl", "wb") as file:
        pickle.dump({"vocab_size": len(alphabet), "itos": dict(enumerate(alphabet)), "stoi": ids}, file)
    return datasets, chars, len(splits["val"].encode()) / len(splits["val"])


def pydoc_topics_text():
    """Python's help() topics: 0.47 MB of English about the language, on every machine."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics.values())


def nanogpt_train(checkout, folder, dataset, arguments=()):
    """nanoGPT's train.py at its CPU example on folder/data/<dataset>, then arguments; its stdout.
    It runs in folder, so the checkout is left as it was."""
    configurator = folder / "configurator.py"  # its train.py runs ./configurator.py and reads ./data/<dataset>
    configurator.unlink(missing_ok=True)
    configurator.symlink_to((Path(checkout) / "configurator.py").resolve())
    finished = subprocess.run([sys.executable, str(Path(checkout) / "train.py"),
                               str(Path(checkout) / "config" / "train_shakespeare_char.py"), f"--dataset={dataset}",
                               *NANOGPT_CPU_EXAMPLE, *arguments], capture_output=True, text=True, cwd=folder)
    if finished.returncode != 0:
        raise flags.UserError(f"nanoGPT's train.py in {checkout} failed: {(finished.stderr or finished.stdout).strip()[-300:]}")
    return finished.stdout


def nanogpt_run(checkout, chars, bytes_per_char):
    """nanoGPT's CPU example on the characters; (its val bits per byte, its wall seconds)."""
    started = time.perf_counter()
    said = nanogpt_train(checkout, chars, "text")
    seconds = time.perf_counter() - started
    val = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", said)
    if not val:
        raise flags.UserError(f"nanoGPT's train.py in {checkout} printed no evaluation: {said.strip()[-300:]}")
    return float(val[-1]) / math.log(2) / bytes_per_char, seconds


def bench_small_text(settings):
    """The own-text scenario: the quick start's config on a small text prepared with default
    flags, against nanoGPT's character model at nanoGPT's wall time when --nanogpt gives a
    checkout; --vocab_sizes adds our runs at those vocabularies; with neither, GPT-2's recipe
    at --budget is the reference. Runs in turn, seed by seed (A B A B); final and best val bits per byte."""
    datasets, chars, bytes_per_char = small_text_datasets(settings, Path(settings["out_dir"]) / "small_text")
    table = {}
    for seed in range(1, settings["seeds"] + 1):
        budget = settings["budget"]
        if settings["nanogpt"]:
            bpb, budget = nanogpt_run(settings["nanogpt"], chars, bytes_per_char)
            table.setdefault("nanoGPT chars", []).append({"final bits/byte": bpb, "best bits/byte": bpb,
                                                          "seconds": budget})
            print(f"nanoGPT chars seed {seed}: {bpb:.4f} bits/byte in {budget:.0f} s", flush=True)
        alone = not (settings["nanogpt"] or settings["vocab_sizes"])  # then GPT-2's recipe is the reference
        runs = [("gpt2_recipe", "default", RECIPES["gpt2"])] if alone else []
        runs += [(f"defaults_vocab_{vocab}", vocab, []) for vocab in datasets]
        for name, vocab, arguments in runs:
            run_settings = {**settings, "dataset": str(datasets[vocab].resolve()), "shape": "config/train_demo.py"}
            evaluations, _ = train_run(run_settings, name, seed, [*arguments, f"--max_time={budget:.1f}"])
            meta = json.loads((datasets[vocab] / "meta.json").read_text())
            said = (Path(settings["out_dir"]) / f"{name}_seed{seed}" / "stdout.txt").read_text()
            data_line = re.search(r"^data: .* train tokens [\d.]+ times(.*)$", said, re.M)[1]
            set_from_reads = {key: float(value) for key, value in re.findall(r"(\w+)=([\d.]+)", data_line)}
            row = {"vocab": meta["tokenizer"]["vocab_size"], "dropout": set_from_reads["dropout"],
                   "weight decay": set_from_reads["weight_decay"],
                   "final bits/byte": evaluations[-1]["val_bpb"],
                   "best bits/byte": min(line["val_bpb"] for line in evaluations[1:]),
                   "seconds": evaluations[-1]["elapsed_s"]}
            table.setdefault(name, []).append(row)
            print(f"{name} seed {seed}: " + " | ".join(f"{key} {value:,.4g}" for key, value in row.items()), flush=True)
    reference = next(iter(table))
    first = statistics.median(row["final bits/byte"] for row in table[reference])
    print(f"\nmedians over {settings['seeds']} seed(s); final bits/byte as a ratio to {reference}'s, and "
          "final / best (above 1: the run ended worse than its best evaluation):")
    for name, rows in table.items():
        final, best = (statistics.median(row[key] for row in rows) for key in ("final bits/byte", "best bits/byte"))
        print(f"{name:>24}: final {final:.4f} ({final / first:.3f}x) | best {best:.4f} | final/best {final / best:.3f}")


# ----------------------------------------------------------------------------- chat

def chat_choice_items(meta, path, seed=0):
    """The multiple-choice check in chat form, written to path: for each held-out function of
    the stdlib_chat dataset (the val split's), "What does NAME do?" and four answers, its
    docstring's first paragraph and three other held-out functions', in a random order."""
    fraction = meta["settings"]["val_fraction"]
    held_out = [function for function in stdlib_chat.stdlib_functions() if split_of(function.name, fraction) == "val"]
    rng = random.Random(seed)
    lines = []
    for function in held_out:
        others = rng.sample([other.doc for other in held_out if other.doc != function.doc], 3)
        label = rng.randrange(4)
        answers = others[:label] + [function.doc] + others[label:]
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What does {function.name} do?"}],
                                 "endings": answers, "label": label}))
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return held_out


def chat_evaluation(settings, checkpoint, tasks):
    """train.py --eval_only of checkpoint on the chat dataset's val split and the check: its figures."""
    command = [sys.executable, "train.py", "config/chat_demo.py", f"--dataset={settings['dataset']}",
               f"--init_from={checkpoint}", "--eval_only=True", f"--eval_iters={settings['eval_iters']}",
               f"--eval_tasks={tasks}", f"--device={settings['device']}"]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise flags.UserError(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
    figures = re.search(r"val loss ([\d.]+) .* ([\d.]+) bits/byte\n.*acc_norm ([\d.]+)%, acc ([\d.]+)%", finished.stdout)
    return {"val loss": float(figures[1]), "val bits/byte": float(figures[2]), "choice acc_norm %": float(figures[3]),
            "choice acc %": float(figures[4])}


def greedy_answers(out_dir, checkpoint_name, functions):
    """The model's greedy answer to "What does NAME do?" for each function."""
    model, tokenizer, _ = load_trained(str(out_dir), checkpoint_name, torch.device("cpu"))
    return ["".join(piece.text for piece in reply(model, tokenizer, [
        {"role": "user", "content": f"What does {function.name} do?"}], 60)) for function in functions]


def bench_chat(settings):
    """The chat demo: the base model (--base) against the same fine-tuned by config/chat_demo.py
    on the stdlib_chat dataset (--dataset), one fine-tuning per seed: val loss and bits per byte on
    the answers about held-out functions, the multiple-choice check (chance 25%), the fine-tuning's
    steps and seconds, and three held-out functions' greedy answers from each."""
    if not Path(settings["base"]).is_file():
        raise flags.UserError(f"--base={settings['base']}: no such checkpoint (the quick start writes out/demo/best.pt)")
    meta = read_meta(open_folder(settings["dataset"]))
    if not meta.get("chat"):
        raise flags.UserError(f"--dataset={settings['dataset']} is not a chat dataset: make one with "
                              "`python prepare.py --source=stdlib_chat --tokenizer=data/python`")
    out_dir = Path(settings["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = out_dir / "chat_choice.jsonl"
    held_out = chat_choice_items(meta, tasks)
    print(f"{len(held_out)} held-out functions: the check's items are in {tasks}", flush=True)
    rows = {"base": [chat_evaluation(settings, settings["base"], tasks)]}
    print(f"base: {rows['base'][0]}", flush=True)
    shown = held_out[::max(1, len(held_out) // 3)][:3]
    for seed in range(1, settings["seeds"] + 1):
        run = out_dir / f"chat_seed{seed}"
        shutil.rmtree(run, ignore_errors=True)
        command = [sys.executable, "train.py", "config/chat_demo.py", f"--dataset={settings['dataset']}",
                   f"--init_from={settings['base']}", f"--out_dir={run}", f"--seed={seed}", f"--device={settings['device']}"]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise flags.UserError(f"{' '.join(command)} failed: {finished.stderr.strip().splitlines()[-1]}")
        (run / "stdout.txt").write_text(finished.stdout)
        done = re.search(r"done: iteration (\d+) in (\S+),", finished.stdout)
        row = chat_evaluation(settings, run / "best.pt", tasks)
        row.update({"steps": int(done[1]), "seconds": json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
                    .get("elapsed_s", 0.0)})
        rows.setdefault("fine-tuned", []).append(row)
        print(f"fine-tuned seed {seed}: {row}", flush=True)
    print("\nmedians:")
    for name, runs in rows.items():
        print(f"{name:>11}: " + " | ".join(f"{key} {statistics.median(run[key] for run in runs):,.4g}" for key in runs[0]))
    print("\ngreedy answers about held-out functions (the base model asked in the same format):")
    base_dir = Path(settings["base"])
    answers = {"base": greedy_answers(base_dir.parent, base_dir.stem if base_dir.stem == "best" else "latest", shown),
               "fine-tuned": greedy_answers(out_dir / "chat_seed1", "best", shown)}
    for index, function in enumerate(shown):
        print(f"\nWhat does {function.name} do?\n  docstring:  {function.doc}")
        for name, said in answers.items():
            print(f"  {name + ':':<11} {said[index]!r}")

# ----------------------------------------------------------------------------- serving

def ask_streaming(port, question):
    """One streamed chat completion from chat.py --serve on this machine's port: its seconds to the
    first token and to the end, its tokens, and whether it arrived whole (a finish, then [DONE])."""
    sent = time.perf_counter()
    first, finish, tokens, whole = None, None, 0, False
    connection = http.client.HTTPConnection("127.0.0.1", port)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": question}], "stream": True}), {"Content-Type": "application/json"})
        for line in connection.getresponse():  # an error's body has no events: not whole
            if line == b"data: [DONE]\n":
                whole = finish is not None
                break
            if line.startswith(b"data: "):
                event = json.loads(line.removeprefix(b"data: "))
                if first is None and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
                finish = event["choices"][0]["finish_reason"]
                tokens = event["usage"]["completion_tokens"] if finish else tokens
    except OSError:
        pass  # lost
    finally:
        connection.close()
    done = time.perf_counter()
    return {"first_s": (first or done) - sent, "seconds": done - sent, "tokens": tokens, "whole": whole}


def bench_serve(settings):
    """`python chat.py --serve` on --model's chat model, in a process of its own: for each count of
    --clients, that many clients at once each stream --requests answers in turn to questions about
    the standard library (greedy, so every run asks and answers the same): the tokens/s of the
    whole server, each answer's time to its first token, and the requests answered and lost."""
    from owngpt.stdlib_chat import stdlib_functions
    functions = stdlib_functions()
    server = subprocess.Popen([sys.executable, "chat.py", f"--out_dir={settings['model']}", "--serve", "--port=0",
                               "--temperature=0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        start = server.stdout.readline()
        if not start.startswith("serving "):
            raise flags.UserError(f"chat.py --serve --out_dir={settings['model']} did not start: run it to see why")
        port = int(re.search(r"http://[\d.]+:(\d+)", start).group(1))
        for clients in map(int, settings["clients"]):
            count = clients * settings["requests"]
            questions = [f"What does {functions[index * len(functions) // count].name} do?" for index in range(count)]
            answers = [None] * count

            def client(number):
                for index in range(number, count, clients):
                    answers[index] = ask_streaming(port, questions[index])

            began = time.perf_counter()
            threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - began
            whole = [answer for answer in answers if answer["whole"]]
            firsts = sorted(answer["first_s"] for answer in whole)
            tokens = sum(answer["tokens"] for answer in whole)
            print(f"{clients} client(s) x {settings['requests']} requests: {len(whole)} answered, "
                  f"{count - len(whole)} lost; {tokens:,} tokens in {seconds:.1f} s, {tokens / seconds:.1f} tokens/s "
                  f"served; first token after {statistics.median(firsts):.2f} s (median), "
                  f"{firsts[int(0.9 * (len(firsts) - 1))]:.2f} s (90th percentile), {firsts[-1]:.2f} s (most)",
                  flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()


# ----------------------------------------------------------------------------- command line

MODES = {"recipes": bench_recipes, "throughput": bench_throughput, "step": bench_step, "webfilters": bench_webfilters,
         "small_text": bench_small_text, "prepare": bench_prepare, "chat": bench_chat,
         "serve": bench_serve}
DEFAULTS = {"what": "recipes", "recipes": ("gpt2", "modern"), "seeds": 2, "budget": 90.0,
            "shape": "config/train_demo.py", "dataset": "python", "device": "cpu", "iters": 100, "eval_iters": 20,
            "out_dir": "out/bench", "mb": 50.0, "profile": False, "text": "", "nanogpt": "", "vocab_sizes": (),
            "against": (), "base": "out/demo/best.pt", "model": "out/chat", "clients": ("1", "16"),
            "requests": 8}
HELP = {"what": f"what to measure: {', '.join(MODES)}",
        "recipes": f"recipes: training runs to compare, the first is the reference ({', '.join(RECIPES)})",
        "seeds": "seeds per recipe (recipes and throughput)",
        "budget": "recipes: seconds of wall time per training run (train.py's max_time)",
        "shape": "the config file that sets the model and batch shape, or several, comma-separated, applied in order "
                 "(throughput: nanogpt for nanoGPT's CPU example shape)",
        "dataset": "the dataset folder (throughput at nanoGPT's shape wants python_byte: prepare.py --tokenizer=byte "
                   "--name=python_byte)",
        "device": "cpu | cuda | mps",
        "iters": "throughput: iterations per run",
        "eval_iters": "recipes: batches in the final evaluation",
        "out_dir": "where the training runs write (one folder per run)",
        "mb": "webfilters, prepare: megabytes of generated text to measure on",
        "profile": "prepare: run it in one process under cProfile and print the top functions; step: "
                   "torch.profiler's table of each path's operators",
        "text": "small_text: a text file (default: Python's help() topics, 0.47 MB); its last 10% is val",
        "nanogpt": "a nanoGPT checkout (github.com/karpathy/nanoGPT) whose train.py runs its CPU example beside "
                   "ours: small_text, at its wall time (else GPT-2's recipe is the reference, at --budget); "
                   "throughput, for --iters on --dataset's text, the reference of the ratios",
        "vocab_sizes": "small_text: also train on the text prepared at these vocabulary sizes (comma-separated)",
        "against": "recipes, throughput: other owngpt checkouts (comma-separated) whose train.py runs each recipe "
                   "too, first in each round: a change before and after",
        "base": "chat: the checkpoint config/chat_demo.py fine-tunes (the quick start's model)",
        "model": "serve: the chat model's out folder (chat.py --out_dir)",
        "clients": "serve: how many clients ask at once, each count in turn (comma-separated)",
        "requests": "serve: the questions each client asks, one after another"}
CHECKS = {"what": flags.one_of(*MODES), "recipes": recipe_list, "seeds": flags.at_least(1),
          "budget": lambda seconds: None if seconds > 0 else "a positive number of seconds",
          "shape": lambda paths: None if paths == "nanogpt" or all(Path(path).is_file() for path in paths.split(","))
          else "config files, or nanogpt",
          "device": flags.one_of("cpu", "cuda", "mps"),
          "iters": flags.at_least(2), "eval_iters": flags.at_least(1),
          "mb": lambda mb: None if mb > 0 else "a positive number of megabytes",
          "text": lambda path: None if not path or Path(path).is_file() else "a text file",
          "nanogpt": lambda path: None if not path or (Path(path) / "train.py").is_file() else "a nanoGPT checkout",
          "vocab_sizes": lambda sizes: None if all(size.isdigit() and int(size) > 257 for size in sizes) else
          "vocabulary sizes above 257",
          "against": lambda paths: None if all((Path(path) / "train.py").is_file() for path in paths) else
          "owngpt checkouts (folders with a train.py)",
          "clients": lambda counts: None if all(count.isdigit() and int(count) > 0 for count in counts) else
          "positive counts of clients", "requests": flags.at_least(1)}


def main(argv):
    settings = flags.parse(argv, DEFAULTS, HELP, CHECKS, program="bench.py")
    MODES[settings["what"]](settings)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except flags.UserError as error:
        print(f"bench.py: error: {error}", file=sys.stderr)
        sys.exit(1)
