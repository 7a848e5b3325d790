"""prepare.py's chat sources: conversations in, a chat dataset folder out.

    python prepare.py --source=chat --input=conversations.jsonl --tokenizer=data/python --name=mine
    python prepare.py --source=stdlib_chat --tokenizer=data/python   # the offline demo: data/stdlib_chat

A chat dataset is a dataset folder like any other (owngpt/dataset.py) plus, beside each token
shard, a mask shard of the same length and format whose "tokens" are 0 or 1: 1 where the token
is the assistant's, a target the loss counts (owngpt/chat.py: render). Every conversation starts
with end-of-text, as every document does; val is whole conversations, picked by a hash of a
group name (a line of a file, or for stdlib_chat the function it is about, so that val asks
about functions train never shows) or taken from --val_input. meta.json's "chat" entry says how
many conversations, turns and trained tokens each split holds, and which question training
asks the model at each evaluation (the first val conversation's). To fine-tune a model, reuse
its tokenizer (--tokenizer=its dataset folder): the chat tokens are added to one that lacks them.
"""
import json
import time
from collections import Counter
from pathlib import Path

from owngpt.chat import CHAT_TEMPLATE, ChatError, read_conversations, render
from owngpt.dataset import META_FORMAT_VERSION, SPLITS, ShardWriter, atomic_write, token_dtype
from owngpt.filtered import split_of
from owngpt.sources import file_inputs
from owngpt.stdlib_chat import conversation, stdlib_functions
from owngpt.tokenizer import (count_chunks, gpt2_encoding, load_tokenizer, reused_tokenizer, train_bpe,
                              vocab_size_for, with_chat_tokens, write_tiktoken_file)

CHAT_SOURCES = ("chat", "stdlib_chat")


def labelled_conversations(settings):
    """(split, name, messages) of every conversation, in a fixed order."""
    if settings["source"] == "stdlib_chat":
        return [(split_of(function.name, settings["val_fraction"]), f"stdlib:{function.name}", conversation(function))
                for function in stdlib_functions()]
    labelled = []
    for flag, split in (("input", None), ("val_input", "val")):
        inputs, _ = file_inputs(settings[flag], flag) if settings[flag] else ([], None)
        files = [input_file.path for input_file in inputs if input_file.kind == "jsonl"]
        if settings[flag] and not files:
            raise ChatError(f"--{flag}={settings[flag]}: no .jsonl files of conversations")
        for path in files:
            for where, messages in read_conversations(path):
                labelled.append((split or split_of(where, settings["val_fraction"]), where, messages))
    return labelled


def chat_tokenizer(settings, conversations, folder):
    """meta.json's tokenizer entry, the chat tokens in it: --tokenizer's, or a BPE trained on
    the conversations' train messages."""
    kind = settings["tokenizer"]
    if kind == "byte":
        info = {"kind": "byte", "vocab_size": 257, "eot_id": 256, "file": None, "sha256": None}
    elif kind == "gpt2":
        encoding = gpt2_encoding()
        info = {"kind": "gpt2", "vocab_size": encoding.n_vocab, "eot_id": encoding.eot_token, "file": None,
                "sha256": None}
    elif kind == "bpe":
        texts = [message["content"] for split, _, messages in conversations if split == "train" for message in messages]
        size = settings["vocab_size"] if settings["vocab_size_given"] else \
            vocab_size_for(sum(len(text.encode()) for text in texts), settings["vocab_size"])
        vocabulary = train_bpe(count_chunks(texts), size, shrink=not settings["vocab_size_given"])
        info = {"kind": "bpe", "vocab_size": len(vocabulary) + 1, "eot_id": len(vocabulary),
                "file": "tokenizer.tiktoken", "sha256": write_tiktoken_file(folder / "tokenizer.tiktoken", vocabulary)}
    else:  # a path: the tokenizer of the model to fine-tune
        info, file = reused_tokenizer(kind)
        if file:
            atomic_write(folder / "tokenizer.tiktoken", lambda out: out.write(file.read_bytes()))
    return with_chat_tokens(info)


def build_chat_dataset(settings, folder):
    """Reads, splits, renders and writes the conversations into folder; returns meta.json."""
    started = time.perf_counter()
    conversations = labelled_conversations(settings)
    counts = Counter(split for split, _, _ in conversations)
    if not counts["train"] or not counts["val"]:
        raise ChatError(f"{len(conversations)} conversation(s): {counts['train']} for train and {counts['val']} for "
                        f"val; both need at least one (more conversations, another --val_fraction, or --val_input)")
    info = chat_tokenizer(settings, conversations, folder)
    encoding = load_tokenizer(folder, info)
    writers = {(split, kind): ShardWriter(folder, split if kind == "tokens" else f"{split}_mask",
                                          info["vocab_size"] if kind == "tokens" else 2, settings["shard_tokens"])
               for split in SPLITS for kind in ("tokens", "mask")}
    chat = {split: {"conversations": 0, "turns": 0, "trained_tokens": 0} for split in SPLITS}
    try:
        for split, _, messages in conversations:
            ids, mask = render(messages, encoding)
            text_bytes = sum(len(message["content"].encode()) for message in messages)
            writers[split, "tokens"].write_document(ids, text_bytes)
            writers[split, "mask"].write(mask)
            chat[split]["conversations"] += 1
            chat[split]["turns"] += sum(message["role"] == "assistant" for message in messages)
            chat[split]["trained_tokens"] += sum(mask)
        splits = {}
        for split in SPLITS:
            splits[split] = writers[split, "tokens"].close()
            splits[split]["masks"] = writers[split, "mask"].close()["shards"]
            splits[split].update(chat[split])
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    first_val = next(messages for split, _, messages in conversations if split == "val")
    tokens = sum(split["tokens"] - split["documents"] for split in splits.values())
    return {
        "format_version": META_FORMAT_VERSION,
        "tokenizer": info,
        "dtype": token_dtype(info["vocab_size"]).name,
        "splits": splits,
        "bytes_per_token": round(sum(split["bytes"] for split in splits.values()) / max(tokens, 1), 4),
        "sources": [{"kind": settings["source"], "input": settings["input"], "val_input": settings["val_input"]}],
        "settings": {name: value for name, value in settings.items() if name != "web_filters"},
        "chat": {"question": first_val[:next(i for i, m in enumerate(first_val) if m["role"] == "user") + 1],
                 "template": CHAT_TEMPLATE},
        "timings_s": {"total": round(time.perf_counter() - started, 3)},
    }


def chat_report(meta, name):
    """report.md of a chat dataset."""
    lines = [f"# {name}: a chat dataset", "", f"Source: {meta['sources'][0]['kind']}. Tokenizer: "
             f"{meta['tokenizer']['kind']}, {meta['tokenizer']['vocab_size']:,} tokens, the chat tokens "
             f"{', '.join(meta['tokenizer']['chat_tokens'])} among them.", "",
             "| split | conversations | assistant turns | tokens | trained tokens (the assistant's) |",
             "| --- | --- | --- | --- | --- |"]
    for split in SPLITS:
        info = meta["splits"][split]
        lines.append(f"| {split} | {info['conversations']:,} | {info['turns']:,} | {info['tokens']:,} | "
                     f"{info['trained_tokens']:,} ({info['trained_tokens'] / max(info['tokens'], 1):.0%}) |")
    lines += ["", "The question asked at each evaluation: " + json.dumps(meta["chat"]["question"], ensure_ascii=False),
              ""]
    return "\n".join(lines)


def write_chat_dataset(settings, folder, name):
    """build_chat_dataset, then meta.json and report.md; returns meta."""
    meta = build_chat_dataset(settings, Path(folder))
    atomic_write(Path(folder) / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    atomic_write(Path(folder) / "report.md", lambda f: f.write(chat_report(meta, name).encode()))
    return meta
