"""prepare.py: raw text in, a dataset folder out (tokenizer, binary token shards, manifest).

    python prepare.py                       # this Python's standard library -> data/python/
    python prepare.py --source=files --input=notes/,books/*.txt --name=mine
    python prepare.py --source=url --url=https://example.org/book.txt --tokenizer=byte
    python prepare.py --source=commoncrawl --crawl=latest --wet_files=4 --name=web
    python prepare.py --help                # every flag with its default

Common Crawl on many machines (launch/ holds a Slurm and a Kubernetes file that do this):
    python prepare.py --source=commoncrawl --crawl=CC-MAIN-2025-26 --wet_files=1000 \
        --parts=/shared/parts --task=K --tasks=100   # stage one, K = 0..99, anywhere, any order
    python prepare.py --source=commoncrawl --crawl=CC-MAIN-2025-26 --wet_files=1000 \
        --parts=/shared/parts --merge=true           # stage two, once, when all are done

The flow, one stage after another:
  sources   documents (id, text, metadata) from the stdlib, local files, URLs or Common Crawl
  filter    each document is kept (maybe cleaned) or dropped with a reason, counted; the kept
            ones go to a part file with their dedup keys (one part per WET file)
  merge     the parts, deduplicated in (part, record) order: the first copy is kept
  split     a hash of the document id puts a fixed fraction of documents in val
  tokenizer a byte-level BPE trained here on the kept train documents (or byte / gpt2)
  shards    documents tokenized on all cores, written as llm.c-style .bin shards
  manifest  meta.json (read by train.py) and report.md (read by people)

Web text (Common Crawl, and any WET file) gets the web filters of owngpt/web/filters.py:
language, Gopher quality and repetition, C4 line cleanup, FineWeb's rules, exact and
MinHash near-duplicate removal, email/IP masking; each rule's switch and threshold is a
flag. Other text gets only what suits any text: empty documents and exact copies go.

On one machine, the filter stage is task 0 of 1 and the merge follows in the same run: the
same code as on a hundred machines, so the dataset is byte for byte the same. Part i is WET
file i's, named by i (owngpt/filtered.py), written whole or not at all, and a part already
there with the same settings is not made again: a task rerun after a crash or preemption, or
the same command after a failed run, only filters what is missing. --crawl=latest is
resolved once and recorded in the parts folder, so every task reads the same crawl.

The dataset is built in data/.<name>.partial/ and renamed into place when complete, so
data/<name>/ is always the previous dataset or the new one. Local sources are cheap to read
again: their runs always start over.

The library in owngpt/ does the rest: sources.py (the input files and their readers),
dataset.py (shards, meta.json, report.md, atomic writes), tokenizer.py (the BPE), web/crawl.py
(downloads, Common Crawl, WET records), web/filters.py, filtered.py (the parts and the merge),
workers.py (all cores, a status line) and flags.py (--key=value).
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from owngpt import flags
from owngpt.chat_dataset import CHAT_SOURCES, write_chat_dataset
from owngpt.dataset import (META_FORMAT_VERSION, SPLITS, AtomicFile, ShardWriter, atomic_write, build_folder,
                            discard_build, folder_path, publish, report_markdown, start_build, token_dtype)
from owngpt.filtered import (MergedParts, PartsFolder, Tally, check_splits, document_tails, json_line, kept_document,
                             read_manifest, split_of, split_rule)
from owngpt.flags import UserError, at_least, between, matches, one_of
from owngpt.sources import commoncrawl_inputs, file_inputs, python_inputs, read_documents, split_list, url_inputs
from owngpt.tokenizer import (BYTES_PER_VOCAB_ENTRY, SMALLEST_VOCAB, TOKENIZERS, count_chunks, gpt2_encoding,
                              load_tokenizer, python_split_regex, reused_tokenizer, train_bpe, vocab_size_for,
                              with_chat_tokens, write_tiktoken_file)
from owngpt.web import crawl, filters
from owngpt.web.crawl import Dropped
from owngpt.workers import Progress, Workers, batches_of


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Every flag, its default and what it does; the web filter flags follow, one per field of
# filters.WebFilterSettings. `--help` lists them all.
FLAGS = {
    "source": ("python", "where the text comes from: python (this Python's standard library, "
                         "offline), files (--input), url (--url) or commoncrawl (--crawl); or "
                         "conversations: chat (.jsonl files of {\"messages\": [...]}, --input) or "
                         "stdlib_chat (questions about the standard library, offline)"),
    "input": ("", "files and chat sources: comma-separated files, folders and globs of "
                  ".txt .md .rst .py .jsonl .warc.wet .warc.wet.gz"),
    "val_input": ("", "files whose documents form the val split (instead of --val_fraction)"),
    "url": ("", "url source: comma-separated http(s) URLs of plain text, .jsonl or .warc.wet.gz"),
    "crawl": ("latest", "commoncrawl: a crawl id such as CC-MAIN-2025-26, or latest (the "
                        "newest one in --cc_index_url)"),
    "wet_files": (1, "commoncrawl: how many WET files to read, in the order of the crawl's "
                     "wet.paths.gz (one holds the text of tens of thousands of pages)"),
    "max_docs": (0, "keep at most this many documents, the first in file order (0: no limit); "
                    "every file is still read and filtered"),
    "cc_base_url": ("https://data.commoncrawl.org/", "commoncrawl: the server holding "
                    "crawl-data/<crawl>/wet.paths.gz and the WET files it lists"),
    "cc_index_url": ("https://index.commoncrawl.org/collinfo.json", "commoncrawl: the list "
                     "of crawls, newest first"),
    "text_field": ("text", "the field of each .jsonl line that holds the document's text"),
    "filters": ("auto", "web (the web filters below), none (only empty documents and exact "
                        "copies are dropped) or auto: web for commoncrawl and WET files, none "
                        "otherwise"),
    "keep_metadata": (False, "also write docs.jsonl: id, url, date, language, tokens and split "
                             "of every kept document"),
    "tokenizer": ("bpe", "bpe (trained here on the corpus), byte (256 bytes + end-of-text), "
                         "gpt2 (tiktoken's; needs the network once), or the path of a dataset "
                         "folder, out folder or tokenizer.tiktoken whose tokenizer to reuse (to "
                         "fine-tune a model on new text)"),
    "vocab_size": (8192, "bpe only: tokens in the vocabulary, counting the 256 bytes and "
                         "the end-of-text token; without this flag, one per 400 bytes of train "
                         "text (a power of two from 512 up to 8192), or the most the text supports"),
    "tokenizer_train_chars": (20_000_000, "bpe only: train on at most this many characters "
                                          "of the train documents"),
    "shard_tokens": (100_000_000, "tokens per shard file (the last shard holds the rest)"),
    "val_fraction": (0.05, "share held out for val: whole documents picked by a hash of their "
                           "ids, or, with too few documents for that, the last val_fraction of "
                           "each document's text"),
    "num_workers": (_cpu_count(), "processes that filter and tokenize (the shards are the same "
                                  "for any number)"),
    "task": (-1, "commoncrawl on several machines, stage one: filter the WET files whose index i "
                 "in wet.paths.gz has i % tasks == task into --parts, then stop (-1: "
                 "$SLURM_ARRAY_TASK_ID or $JOB_COMPLETION_INDEX when set)"),
    "tasks": (0, "stage one: how many tasks share the WET files (0: $SLURM_ARRAY_TASK_COUNT when "
                 "set; with no task given, this machine filters them all, then merges)"),
    "merge": (False, "stage two, once every task is done: deduplicate the parts in --parts, train "
                     "the tokenizer and write the dataset"),
    "parts": ("", "the folder of filtered parts that the tasks write and --merge reads, shared by "
                  "the machines (default: parts/ in the dataset's build folder, "
                  "data/.<name>.partial/)"),
    "name": ("", "dataset name: writes data/<name>/ (default: the source's name)"),
    "out_dir": ("", "write the dataset to this folder instead of data/<name>/"),
}
WEB_DEFAULTS, WEB_HELP, WEB_CHECKS = filters.settings_flags()
DEFAULTS = {name: default for name, (default, _) in FLAGS.items()} | WEB_DEFAULTS
HELP = {name: help_text for name, (_, help_text) in FLAGS.items()} | WEB_HELP

SOURCES = ("python", "files", "url", "commoncrawl", *CHAT_SOURCES)
FILTER_MODES = ("auto", "web", "none")
URL = r"https?://[^/\s]\S*"


def path_list(spec):
    return None if not spec or split_list(spec) else "comma-separated files, folders or globs"


def url_list(spec):
    urls = split_list(spec)
    valid = all(re.fullmatch(URL, url) for url in urls) and (urls or not spec)
    return None if valid else "comma-separated http(s) URLs"


# What each flag's value may be (a true/false switch is checked by the parser itself).
CHECKS = {
    "source": one_of(*SOURCES),
    "input": path_list,
    "val_input": path_list,
    "url": url_list,
    "crawl": matches(r"[A-Za-z0-9._-]+", "a crawl id such as CC-MAIN-2025-26, or latest"),
    "wet_files": at_least(1),
    "max_docs": at_least(0),
    "cc_base_url": matches(URL, "an http(s) URL"),
    "cc_index_url": matches(URL, "an http(s) URL"),
    "text_field": matches(r".+", "the name of a JSON field"),
    "filters": one_of(*FILTER_MODES),
    "tokenizer": lambda value: None if value in TOKENIZERS or Path(value).exists() else
    f"one of {', '.join(TOKENIZERS)}, or the path of a dataset folder, out folder or tokenizer.tiktoken to reuse",
    "vocab_size": between(1, 2 ** 32),
    "tokenizer_train_chars": at_least(1),
    "shard_tokens": between(1, 2 ** 31 - 1),  # the shard header's int32
    "val_fraction": lambda fraction: None if 0 <= fraction <= 1 else "a fraction between 0 and 1",
    "num_workers": at_least(1),
    "task": lambda task: None if task >= -1 else "a task index from 0 (or -1: from the scheduler's environment)",
    "tasks": at_least(0),
    "parts": lambda path: "a folder, and this is a file" if os.path.isfile(path) else None,
    "name": matches(r"([A-Za-z0-9_-][A-Za-z0-9._-]*)?", "letters, digits, '.', '_' and '-' (or --out_dir)"),
    "out_dir": lambda path: "a folder, and this is a file" if os.path.isfile(path) else None,
} | WEB_CHECKS

# Rules between flags: each returns what is wrong, or None.
RELATIONS = (
    lambda s: None if bool(s["input"]) == (s["source"] in ("files", "chat")) else
    "--input is used with --source=files or chat, and those need it",
    lambda s: None if bool(s["url"]) == (s["source"] == "url") else
    "--url is used with --source=url, and --source=url needs it",
    lambda s: "--val_input does not go with --source=commoncrawl: its val split is --val_fraction of "
    "the pages" if s["val_input"] and s["source"] == "commoncrawl" else None,
    lambda s: f"--vocab_size={s['vocab_size']}: a BPE vocabulary needs at least 257 tokens (256 bytes "
    f"and end-of-text)" if s["tokenizer"] == "bpe" and s["vocab_size"] < 257 else None,
    lambda s: f"--val_fraction={s['val_fraction']}: expected a fraction strictly between 0 and 1 (0 and "
    f"1 only go with --val_input)" if s["val_fraction"] in (0, 1) and not s["val_input"] else None,
    lambda s: "--task, --tasks, --merge and --parts go with --source=commoncrawl (other sources are read "
    "on one machine)" if s["source"] != "commoncrawl" and (s["task"] != -1 or s["tasks"] or s["merge"] or s["parts"])
    else None,
    lambda s: "--merge runs on its own once the tasks are done: leave out --task and --tasks"
    if s["merge"] and (s["task"] != -1 or s["tasks"]) else None,
)

PARTS = "parts"  # the build folder's filtered parts, unless --parts names a shared folder
TOP_DOMAINS = 20  # domains listed in meta.json and report.md


class PrepareError(UserError):
    """Bad input or settings: the message says what was found and what was expected."""


# ----------------------------------------------------------------------------------------
# Sources (owngpt/sources.py): every source is a list of input files, each read into
# documents. Common Crawl's is one crawl, the same for every task.

def pinned_crawl(settings, folder):
    """The crawl id: --crawl, or for --crawl=latest the crawl the parts folder already
    records (latest moves once a month: every task and a rerun must read the same crawl),
    or else the newest one now."""
    recorded = read_manifest(folder)
    if settings["crawl"] != "latest":
        return settings["crawl"]
    if recorded is not None and recorded["fingerprint"]["crawl"]:
        return recorded["fingerprint"]["crawl"]
    return crawl.crawl_ids(settings["cc_index_url"])[0]


def crawl_source(settings, crawl_id, wet_paths):
    """meta.json's sources entry for Common Crawl."""
    base_url = settings["cc_base_url"].rstrip("/") + "/"
    return {"kind": "commoncrawl", "crawl": crawl_id, "wet_paths": f"{base_url}crawl-data/{crawl_id}/wet.paths.gz",
            "wet_files": wet_paths}


# ----------------------------------------------------------------------------------------
# Filter stage (stage one). Each document is kept (maybe cleaned) or dropped with a reason
# by the worker processes, and the kept ones go to a part file with their dedup keys:
# part i holds WET file i, so any number of tasks on any machines, each taking the files
# i % tasks == task, make the same parts. Nothing here depends on another part, so a task
# that fails or is killed redoes only the parts it had not finished.

# Flags that only the merge reads, or that only say where things are: changing them keeps
# the parts. --crawl is in the fingerprint as the crawl id it resolved to.
LATER_STAGE_FLAGS = ("tokenizer", "vocab_size", "tokenizer_train_chars", "shard_tokens", "num_workers",
                     "name", "out_dir", "keep_metadata", "wet_files", "cc_base_url", "cc_index_url",
                     "max_docs", "task", "tasks", "merge", "parts", "crawl")


def uses_web_filters(settings, inputs):
    """--filters=auto means web filters for Common Crawl and for WET files."""
    if settings["filters"] == "auto":
        return settings["source"] == "commoncrawl" or any(input_file.kind == "wet" for input_file in inputs)
    return settings["filters"] == "web"


_web_settings = None  # the web filters' settings in each worker process (None: not web text)


def _start_filter_worker(web_settings):
    global _web_settings
    _web_settings = web_settings


def _filter_batch(batch):
    """For each (split, document): (drop reason, None) or (None, the kept document's line
    for its part file, with its dedup key). A record the reader could not read (a Dropped)
    keeps its reason. The JSON is made here, in the workers, not in the main process."""
    results = []
    for split, document in batch:
        if isinstance(document, Dropped):
            results.append((document.reason, None))
            continue
        if _web_settings is None:
            text, reason = (document.text, None) if document.text.strip() else (None, "empty")
            key = filters.exact_signature(text) if text is not None else None
        else:
            text, reason = filters.filter_document(document.text, document.metadata, _web_settings)
            key = filters.dedup_signature(text, _web_settings) if text is not None else None
        results.append((reason, None if reason else json_line(kept_document(split, document, text, key))))
    return results


def labelled_documents(settings, inputs, val_inputs):
    """(split, document) for every document read, in a fixed order; a Dropped takes the
    place of a record the reader could not read."""
    parts = [("train", inputs), ("val", val_inputs)] if val_inputs else [(None, inputs)]
    for split, files in parts:
        for input_file in files:
            for document in read_documents(input_file, settings["text_field"]):
                if isinstance(document, Dropped):
                    yield split or "train", document
                else:
                    yield split or split_of(document.id, settings["val_fraction"]), document


@dataclass(frozen=True)
class Part:
    """Documents filtered as a unit, finished or not at all: one Common Crawl WET file,
    or all the files of a local source."""
    name: str
    inputs: list
    val_inputs: list = ()


def filter_fingerprint(settings, web_settings, crawl_id):
    """What the parts depend on, as JSON: parts made with another fingerprint are not used."""
    flags = {name: value for name, value in settings.items()
             if name in FLAGS and name not in LATER_STAGE_FLAGS}
    web = dataclasses.asdict(web_settings) if web_settings else None
    return json.loads(json.dumps({"flags": flags, "web_filters": web, "crawl": crawl_id}))


def filter_stage(settings, parts, web_settings, parts_folder, task, tasks):
    """Filters part i, for each i % tasks == task, into parts_folder, unless it is there
    already. Returns how many parts it filtered now."""
    mine = range(task, len(parts), tasks)
    todo = [index for index in mine if not parts_folder.finished(index)]
    if len(todo) < len(mine):
        print(f"filter: {len(mine) - len(todo)} of this task's {len(mine)} parts are in {parts_folder.folder} "
              f"already; filtering the other {len(todo)}", file=sys.stderr)
    progress, total = Progress("filter", "MB"), Tally()
    with Workers(settings["num_workers"], _start_filter_worker, (web_settings,)) as workers:
        for done, index in enumerate(todo):
            start, tally = time.perf_counter(), Tally()
            part_file = parts_folder.new_part(index, parts[index].name)
            try:
                filter_part(settings, parts[index], workers, part_file, tally, total, progress)
                parts_folder.finish_part(part_file, tally, time.perf_counter() - start)
            except BaseException as error:
                part_file.discard()
                if settings["source"] == "commoncrawl" and isinstance(error, UserError):
                    finished = len(mine) - len(todo) + done
                    raise PrepareError(f"{error}\n{finished} of the {len(mine)} WET files of this task are "
                                       f"filtered and kept in {parts_folder.folder}: run the same command again to "
                                       f"go on with the others.") from None
                raise
            total.add(tally)
    progress.finish(total.bytes_read / 1e6, f"{total.documents_read:,} documents read")
    return len(todo)


def filter_part(settings, part, workers, part_file, tally, total, progress):
    """Filters one part's documents into part_file, counting them in tally."""
    batches = batches_of(labelled_documents(settings, part.inputs, part.val_inputs),
                         text_of=lambda item: "" if isinstance(item[1], Dropped) else item[1].text)
    for batch, results in workers.map(_filter_batch, batches):
        for (_, document), (reason, line) in zip(batch, results):
            tally.read(document)
            if reason:
                tally.drop(reason, None if isinstance(document, Dropped) else document.text)
            else:
                part_file.file.write(line)
        progress.update((total.bytes_read + tally.bytes_read) / 1e6,
                        f"{total.documents_read + tally.documents_read:,} documents read ({part.name})")


def merge_parts(settings, parts_folder, count, web_settings):
    """Stage two's start: every part there, deduplicated in (part, record) order."""
    # web text: normalised and near copies go; other text: only copies of the exact text
    deduplicator = filters.Deduplicator(web_settings) if web_settings else filters.Deduplicator.exact_only()
    progress = Progress("merge", "parts", count)
    merged = MergedParts(parts_folder, count, deduplicator, settings["max_docs"], progress)
    progress.finish(count, f"{merged.tally().kept:,} documents kept")
    return merged


def check_kept(tally):
    """Stops when filtering left nothing, saying which filter took the documents."""
    if tally.kept:
        return
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(tally.dropped.items()))
    message = f"no documents found: read {tally.documents_read} documents"
    message += f", dropped {dropped}" if dropped else ""
    by_filter = Counter()
    for reason, count in tally.dropped.items():
        by_filter[reason.partition(":")[0]] += count
    if by_filter:
        name, count = by_filter.most_common(1)[0]
        if name in WEB_DEFAULTS:  # a web filter, which has a switch and thresholds
            message += (f". The {name} filter dropped {count} of them: see its flags in "
                        f"python prepare.py --help, or turn it off with --{name}=false")
    raise PrepareError(message)


# ----------------------------------------------------------------------------------------
# Tokenizer: trained on the train documents (owngpt/tokenizer.py holds the BPE itself)

def training_texts(filtered, budget, progress):
    """The kept train documents' texts, up to budget characters in all."""
    used = 0
    for document in filtered.documents():
        if document["split"] == "train":
            text = document["text"][:budget - used]
            used += len(text)
            progress.update(used / 1e6)
            yield text
            if used == budget:
                return


def build_tokenizer(settings, filtered, folder, timings):
    """Trains, fetches or reuses the tokenizer; returns meta.json's tokenizer entry."""
    kind = settings["tokenizer"]
    if kind not in TOKENIZERS:  # a path: another dataset's or model's tokenizer, to fine-tune on this text
        info, file = reused_tokenizer(kind)
        if file:
            atomic_write(folder / "tokenizer.tiktoken", lambda f: f.write(file.read_bytes()))
        print(f"tokenizer: the {info['kind']} tokenizer of {kind}, {info['vocab_size']:,} tokens", file=sys.stderr)
        return info
    if kind == "byte":
        return {"kind": "byte", "vocab_size": 257, "eot_id": 256, "file": None, "sha256": None}
    if kind == "gpt2":
        encoder = gpt2_encoding()
        return {"kind": "gpt2", "vocab_size": encoder.n_vocab, "eot_id": encoder.eot_token,
                "file": None, "sha256": None}
    start = time.perf_counter()
    budget = settings["tokenizer_train_chars"]
    progress = Progress("bpe text", "M chars", min(budget, filtered.tally().kept_bytes) / 1e6)
    chunk_counts = Counter()
    batches = batches_of(training_texts(filtered, budget, progress), text_of=lambda text: text)
    with Workers(settings["num_workers"], python_split_regex, ()) as workers:
        for _, counts in workers.map(count_chunks, batches):
            chunk_counts.update(counts)  # in batch order: first seen first, as one process counts them
    chars = sum(len(chunk) * count for chunk, count in chunk_counts.items())  # chunks cover the text
    progress.finish(chars / 1e6, f"{len(chunk_counts):,} unique chunks")
    timings["tokenizer_count"] = time.perf_counter() - start
    start = time.perf_counter()
    tally = filtered.tally()
    vocab_size = (settings["vocab_size"] if settings["vocab_size_given"] else
                  vocab_size_for(tally.kept_bytes - tally.kept_val_bytes, settings["vocab_size"]))
    progress = Progress("bpe", "merges", vocab_size - 257)
    # without --vocab_size, a text too small for its share gets the largest vocabulary it supports
    vocabulary = train_bpe(chunk_counts, vocab_size, progress, shrink=not settings["vocab_size_given"])
    progress.finish(len(vocabulary) - 256)
    timings["tokenizer_merges"] = time.perf_counter() - start
    sha256 = write_tiktoken_file(folder / "tokenizer.tiktoken", vocabulary)
    info = {"kind": "bpe", "vocab_size": len(vocabulary) + 1, "eot_id": len(vocabulary),
            "file": "tokenizer.tiktoken", "sha256": sha256}
    if info["vocab_size"] < vocab_size:
        info["note"] = (f"this text supports {info['vocab_size']:,} tokens (past that no pair of tokens occurs "
                        f"twice), fewer than {vocab_size:,}: using {info['vocab_size']:,}")
    elif vocab_size < settings["vocab_size"]:
        info["note"] = (f"{vocab_size:,} tokens, not the default {settings['vocab_size']:,}: without --vocab_size a "
                        f"text gets one per {BYTES_PER_VOCAB_ENTRY} bytes of train text (a power of two, at least "
                        f"{SMALLEST_VOCAB}), so that each token occurs often enough to be learned from "
                        f"({(tally.kept_bytes - tally.kept_val_bytes) / 1e6:.2f} MB here)")
    if info.get("note"):
        print(f"bpe: {info['note']}", file=sys.stderr)
    return with_chat_tokens(info)  # after the BPE's ids, so its tokens and end-of-text keep theirs


# ----------------------------------------------------------------------------------------
# Shards: tokenize on all cores, stream tokens into llm.c .bin files

_tokenizer = None  # (encoder, shard dtype) in each worker process


def _start_tokenize_worker(folder, tokenizer_info, dtype):
    global _tokenizer
    _tokenizer = load_tokenizer(folder, tokenizer_info), dtype


def _tokenize_batch(texts):
    """For each text: (tokens, text bytes), where the tokens start with the end-of-text
    token that begins every document."""
    encoder, dtype = _tokenizer
    results = []
    for text in texts:
        # disallowed_special=() encodes a literal "<|endoftext|>" in the text as plain text
        ids = encoder.encode_to_numpy(text, disallowed_special=())
        tokens = np.empty(len(ids) + 1, dtype=dtype)
        tokens[0] = encoder.eot_token
        tokens[1:] = ids
        results.append((tokens, len(text.encode("utf-8", "surrogatepass"))))
    return results


@dataclass
class KeptSummary:
    """What the documents in the shards are: their languages and the domains they came from."""
    languages: Counter = field(default_factory=Counter)
    domains: Counter = field(default_factory=Counter)  # one entry per domain: memory grows with them

    def add(self, document):
        self.languages[document["language"] or "unknown"] += 1
        host = urllib.parse.urlsplit(document["url"]).hostname if document["url"] else None
        if host:
            self.domains[host.removeprefix("www.")] += 1


def write_shards(settings, filtered, folder, tokenizer_info, rule):
    """Tokenizes the kept documents into the train and val shards (whole documents, or each
    one's head and tail: filtered.split_rule), and docs.jsonl with --keep_metadata; returns
    the splits' summaries and a KeptSummary."""
    writers = {split: ShardWriter(folder, split, tokenizer_info["vocab_size"], settings["shard_tokens"])
               for split in SPLITS}
    listing = AtomicFile(folder / "docs.jsonl") if settings["keep_metadata"] else None
    summary = KeptSummary()

    def write(split, tokens, text_bytes, document):
        writers[split].write_document(tokens, text_bytes)
        summary.add(document)
        if listing:
            entry = {name: document[name] for name in ("id", "url", "date", "language")}
            entry.update(tokens=len(tokens), split=split)  # tokens: with the leading end-of-text
            listing.file.write(json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")

    progress = Progress("shards", "MB", filtered.tally().kept_bytes / 1e6)
    done_bytes = 0
    documents = document_tails(filtered.documents(), settings["val_fraction"]) if rule == "tails" \
        else filtered.documents()
    batches = batches_of(documents, text_of=lambda document: document["text"])
    try:
        with Workers(settings["num_workers"], _start_tokenize_worker,
                     (folder, tokenizer_info, writers["train"].dtype)) as workers:
            texts = lambda batch: [document["text"] for document in batch]
            for batch, results in workers.map(_tokenize_batch, batches, task_of=texts):
                for document, (tokens, text_bytes) in zip(batch, results):
                    write(document["split"], tokens, text_bytes, document)
                    done_bytes += text_bytes
                progress.update(done_bytes / 1e6, tokens_summary(writers))
        progress.finish(done_bytes / 1e6, tokens_summary(writers))
        splits = {split: writer.close() for split, writer in writers.items()}
        if listing:
            listing.commit()
    except BaseException:
        for writer in writers.values():
            writer.discard()
        if listing:
            listing.discard()
        raise
    check_splits(splits, settings["val_input"])
    return splits, summary


def tokens_summary(writers):
    return ", ".join(f"{writer.documents:,} {split} docs {writer.tokens / 1e6:,.2f}M tokens"
                     for split, writer in writers.items())


# ----------------------------------------------------------------------------------------
# Manifest and report

def manifest(settings, web_settings, tokenizer_info, splits, summary, tally, sources, timings):
    tokens = sum(split["tokens"] - split["documents"] for split in splits.values())  # no eot
    text_bytes = sum(split["bytes"] for split in splits.values())
    filter_names = (["empty", *(name for name in filters.SWITCHES if getattr(web_settings, name))]
                    if web_settings else ["empty", "exact_duplicates"])
    return {
        "format_version": META_FORMAT_VERSION,
        "tokenizer": tokenizer_info,
        "dtype": token_dtype(tokenizer_info["vocab_size"]).name,
        "splits": splits,
        "bytes_per_token": round(text_bytes / max(tokens, 1), 4),  # text bytes per text token
        "sources": sources,
        "settings": {name: value for name, value in settings.items() if name != "web_filters"},
        "filters": filter_names,
        "web_filters": dataclasses.asdict(web_settings) if web_settings else None,
        "documents": {"read": tally.documents_read, "bytes_read": tally.bytes_read,
                      "kept": tally.kept,  # documents: under the tails rule each gives a train and a val piece
                      "invalid_utf8": tally.invalid_utf8},
        "dropped": dict(sorted(tally.dropped.items())),
        "dropped_examples": dict(sorted(tally.examples.items())),
        "kept_languages": dict(summary.languages.most_common()),
        "top_domains": dict(summary.domains.most_common(TOP_DOMAINS)),
        "timings_s": {stage: round(seconds, 3) for stage, seconds in timings.items()},
        "throughput": throughput(tally, text_bytes, splits, timings),
    }


def throughput(tally, kept_bytes, splits, timings):
    """Documents and megabytes of text per second: of filtering (per task: the parts'
    seconds, over every task), of tokenizing the kept documents into shards, and of all
    the stages as one machine would run them (the filtering counted in task-seconds)."""
    def rate(documents, text_bytes, seconds):
        seconds = max(seconds, 1e-6)
        return {"documents_per_s": round(documents / seconds, 1),
                "mb_per_s": round(text_bytes / 1e6 / seconds, 3)}
    kept = sum(split["documents"] for split in splits.values())
    one_machine = timings["filter"] + timings["merge"] + timings["tokenizer"] + timings["shards"]
    return {"filter": rate(tally.documents_read, tally.bytes_read, timings["filter"]),
            "shards": rate(kept, kept_bytes, timings["shards"]),
            "total": rate(tally.documents_read, tally.bytes_read, one_machine)}


# ----------------------------------------------------------------------------------------
# Command line and the whole run

def read_settings(argv):
    """The run's settings from its --key=value flags (owngpt/flags.py), every value checked; the
    web filter flags become settings["web_filters"], a filters.WebFilterSettings."""
    given = set()
    values = flags.parse(argv, DEFAULTS, HELP, CHECKS, program="prepare.py", relations=RELATIONS, given=given)
    settings = {name: values[name] for name in FLAGS}
    settings["web_filters"] = filters.WebFilterSettings(**{name: values[name] for name in WEB_DEFAULTS})
    settings["vocab_size_given"] = "vocab_size" in given  # else the text's size picks it (vocab_size_for)
    return settings


def dataset_folder(settings):
    folder = Path(settings["out_dir"]) if settings["out_dir"] else folder_path(settings["name"] or settings["source"])
    return folder.resolve()


def resolve_inputs(settings, build, final):
    """A local source as one part to filter (see Part), meta.json's sources list, and the
    web filters' settings (None when the text is not web text)."""
    if settings["source"] == "python":
        inputs, source = python_inputs()
        sources = [source]
    elif settings["source"] == "files":
        inputs, source = file_inputs(settings["input"])
        sources = [source]
    else:
        inputs, sources = url_inputs(settings["url"], build / "downloads", final / "downloads")
    val_inputs = []
    if settings["val_input"]:
        val_inputs, val_source = file_inputs(settings["val_input"], flag="val_input")
        sources.append({**val_source, "kind": "val_files"})
    if not inputs:
        raise PrepareError(f"no documents found: --source={settings['source']} gave no input files")
    web_settings = settings["web_filters"] if uses_web_filters(settings, inputs + val_inputs) else None
    return [Part(settings["source"], inputs, val_inputs)], sources, web_settings


def commoncrawl_web_settings(settings):
    return None if settings["filters"] == "none" else settings["web_filters"]


def parts_folder_of(settings, final):
    """(the parts folder, whether it is the build folder's own)."""
    if settings["parts"]:
        return Path(settings["parts"]).resolve(), False
    return build_folder(final) / PARTS, True


def task_of(settings, environment):
    """(task, tasks) when this run is one stage-one task, from the flags or else the
    scheduler's environment (Slurm job arrays, Kubernetes indexed jobs); None when it
    filters every part itself (or merges)."""
    if settings["source"] != "commoncrawl" or settings["merge"]:
        return None
    task, tasks = settings["task"], settings["tasks"]
    if task == -1:
        for name in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"):
            if environment.get(name, "").isdigit():
                task, task_from = int(environment[name]), f"${name}={environment[name]}"
                break
    if tasks == 0 and environment.get("SLURM_ARRAY_TASK_COUNT", "").isdigit():
        tasks = int(environment["SLURM_ARRAY_TASK_COUNT"])
    if task == -1 and tasks == 0:
        return None
    if task == -1:
        raise PrepareError(f"--tasks={tasks}: which task is this? Give --task=K, K from 0 to {tasks - 1} (or run "
                           f"it as a Slurm array task or a Kubernetes indexed job, which set it)")
    given = f"--task={task}" if settings["task"] != -1 else task_from
    if tasks == 0:
        raise PrepareError(f"{given}: how many tasks share the WET files? Give --tasks=N")
    if task >= tasks:
        raise PrepareError(f"{given}: expected a task index from 0 to {tasks - 1} (--tasks={tasks}); a Slurm "
                           f"array counts from 0: --array=0-{tasks - 1}")
    return task, tasks


def filter_crawl(settings, folder, private, task, tasks):
    """Stage one on Common Crawl: the crawl pinned, this task's WET files filtered into
    folder. Returns the PartsFolder, the crawl id, the web filters' settings and how many
    WET files it filtered now."""
    crawl_id, inputs = commoncrawl_inputs(settings, pinned_crawl(settings, folder))
    web_settings = commoncrawl_web_settings(settings)
    parts_folder = PartsFolder(folder, filter_fingerprint(settings, web_settings, crawl_id), private)
    parts = [Part(input_file.name, [input_file]) for input_file in inputs]
    filtered = filter_stage(settings, parts, web_settings, parts_folder, task, tasks)
    return parts_folder, crawl_id, web_settings, filtered


def crawl_parts_to_merge(settings, folder):
    """--merge: the parts the tasks wrote, made with these settings. Returns the
    PartsFolder, the crawl id and the web filters' settings."""
    if read_manifest(folder) is None:
        raise PrepareError(f"--merge: {folder} holds no parts: run the stage-one tasks first (the same "
                           f"command with --task and --tasks, without --merge)")
    web_settings = commoncrawl_web_settings(settings)
    crawl_id = pinned_crawl(settings, folder)
    parts_folder = PartsFolder(folder, filter_fingerprint(settings, web_settings, crawl_id), private=False)
    return parts_folder, crawl_id, web_settings


def run_task(settings, final, task, tasks):
    """Stage one alone: this task's parts of the crawl."""
    folder, private = parts_folder_of(settings, final)
    _, crawl_id, _, filtered = filter_crawl(settings, folder, private, task, tasks)
    print(f"task {task} of {tasks}: filtered {filtered} WET file(s) of crawl {crawl_id} into {folder}; once "
          f"every task is done, run the same command with --merge=true (and no --task or --tasks)")


def build_dataset(settings, build, final):
    """Every stage in order; writes the dataset into build and returns its meta.json. With
    --merge, the parts are the tasks'; without, this run filters them all first, as one
    task of one: the same parts, so the same dataset."""
    if settings["source"] in CHAT_SOURCES:
        return write_chat_dataset(settings, build, final.name)
    timings, start = {}, time.perf_counter()
    folder, private = parts_folder_of(settings, final)
    if settings["source"] == "commoncrawl" and settings["merge"]:
        parts_folder, crawl_id, web_settings = crawl_parts_to_merge(settings, folder)
    elif settings["source"] == "commoncrawl":
        parts_folder, crawl_id, web_settings, _ = filter_crawl(settings, folder, private, 0, 1)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # local text is cheap to read again
        parts, sources, web_settings = resolve_inputs(settings, build, final)
        parts_folder = PartsFolder(folder, filter_fingerprint(settings, web_settings, None), private)
        filter_stage(settings, parts, web_settings, parts_folder, 0, 1)
    count = settings["wet_files"] if settings["source"] == "commoncrawl" else 1
    timings["stage_one"] = time.perf_counter() - start  # this run's filtering, and listing the inputs
    stage_start = time.perf_counter()
    filtered = merge_parts(settings, parts_folder, count, web_settings)
    tally = filtered.tally()
    timings["merge"] = time.perf_counter() - stage_start
    timings["filter"] = filtered.seconds  # seconds of the tasks that made the parts, all together
    check_kept(tally)
    if settings["source"] == "commoncrawl":
        sources = [crawl_source(settings, crawl_id, filtered.names)]
    stage_start = time.perf_counter()
    tokenizer_info = build_tokenizer(settings, filtered, build, timings)
    timings["tokenizer"] = time.perf_counter() - stage_start
    stage_start = time.perf_counter()
    rule, why = split_rule(settings, tally)
    print(f"split: val is {why}", file=sys.stderr)
    splits, summary = write_shards(settings, filtered, build, tokenizer_info, rule)
    timings["shards"] = time.perf_counter() - stage_start
    timings["total"] = time.perf_counter() - start
    meta = manifest(settings, web_settings, tokenizer_info, splits, summary, tally, sources, timings)
    meta["split_rule"] = {"rule": rule, "why": why}
    atomic_write(build / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    atomic_write(build / "report.md", lambda f: f.write(report_markdown(meta, final.name).encode()))
    if private:
        shutil.rmtree(folder)  # the shards hold it now; a --parts folder is the user's to keep
    return meta


def main(argv):
    settings = read_settings(argv)
    final = dataset_folder(settings)
    task = task_of(settings, os.environ)
    if task is not None:
        run_task(settings, final, *task)
        return
    build = start_build(final, keep=("downloads", PARTS))  # what a failed run left for this one
    try:
        meta = build_dataset(settings, build, final)
    except BaseException:
        resumable = settings["source"] == "commoncrawl" and any((build / PARTS).glob("part_*.jsonl"))
        discard_build(build, keep=("downloads", PARTS) if resumable else ("downloads",))
        raise
    publish(build, final)
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"wrote {final}: train {train['tokens']:,} tokens in {len(train['shards'])} shard(s), "
          f"val {val['tokens']:,} tokens, {meta['tokenizer']['kind']} vocab "
          f"{meta['tokenizer']['vocab_size']:,}, {meta['bytes_per_token']} bytes/token, "
          f"{meta['timings_s']['total']:.1f} s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (UserError, OSError) as error:
        print(f"prepare.py: error: {error}", file=sys.stderr)
        sys.exit(1)
