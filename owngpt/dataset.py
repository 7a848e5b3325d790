"""The dataset folder: what prepare.py writes and train.py reads, and how files are written safely.

    data/<name>/train_000000.bin ...  token shards (llm.c's format, below)
    data/<name>/val_000000.bin ...    held-out text, never in train
    data/<name>/tokenizer.tiktoken    a trained BPE's vocabulary (tokenizer.py)
    data/<name>/meta.json             the manifest: tokenizer, dtype, splits, sources, filters
    data/<name>/report.md             what was kept and dropped, for people

    folder = dataset.open_folder("python")           # data/python, checked
    meta = dataset.read_meta(folder)
    shards = dataset.read_split(folder, meta, "val")  # read-only numpy memmaps
    windows = dataset.load_windows(folder, meta, "train", block_size=256)  # what training batches are cut from

A shard is a header of 256 little-endian int32 ([magic, version, token count, 0...]) and then
exactly that many tokens: uint16 (magic 20240520, version 1) for vocabularies up to 65536,
uint32 (magic 20240801, version 7) above, as llm.c and modded-nanogpt write them. Every
document starts with the end-of-text token. Every file is written through atomic_write: a
reader sees the old file or the whole new one, never a half-written one. A whole dataset is
built in a hidden sibling folder (start_build) and renamed into place when complete (publish),
so data/<name>/ is always the previous dataset or the new one; report.md is meta.json told
for people (report_markdown).
"""
import bisect
import json
import os
import secrets
import shutil
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from owngpt.flags import UserError

EOT = "<|endoftext|>"
META_FORMAT_VERSION = 1
SPLITS = ("train", "val")
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_FORMATS = {  # magic -> (version, token dtype)
    20240520: (1, np.dtype("<u2")),
    20240801: (7, np.dtype("<u4")),
}


class DatasetError(UserError):
    """A dataset folder, shard or manifest that is missing or does not follow the contract."""


class ShardError(DatasetError):
    """A token shard that does not follow the llm.c format (the message names the file)."""


def shard_magic(vocab_size):
    """The shard format for a vocabulary: uint16 holds ids below 65536, larger ones need uint32."""
    return 20240520 if vocab_size <= 2 ** 16 else 20240801


def token_dtype(vocab_size):
    return SHARD_FORMATS[shard_magic(vocab_size)][1]


# ----------------------------------------------------------------------------- atomic writes
class AtomicFile:
    """A file written under a temporary name in its final folder, then renamed onto its
    final name once complete: a reader sees the old file or the whole new one, never half."""

    def __init__(self, path):
        self.path = Path(path)
        self.temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        # os.open with mode 0o666 honours the umask (mkstemp would force 0o600)
        descriptor = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file = os.fdopen(descriptor, "wb")

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temporary, self.path)
        fsync_folder(self.path.parent)

    def discard(self):
        try:
            self.file.close()  # raises again if the failure was a flush that close retries
        finally:
            self.temporary.unlink(missing_ok=True)


def fsync_folder(folder):
    """Makes a rename inside folder durable (POSIX; Windows cannot open a folder)."""
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def atomic_write(path, write):
    """Calls write(f) with a binary file that becomes `path` only if write returns."""
    target = AtomicFile(path)
    try:
        write(target.file)
        target.commit()  # inside: a full disk may only show when the data is flushed
    except BaseException:
        target.discard()
        raise


# ----------------------------------------------------------------------------- shards
class ShardWriter:
    """Streams one split's tokens into shards of shard_tokens tokens each (the last one
    shorter); each shard is an AtomicFile whose header is filled in when it is full."""

    def __init__(self, folder, split, vocab_size, shard_tokens):
        self.folder, self.split, self.shard_tokens = Path(folder), split, shard_tokens
        self.magic = shard_magic(vocab_size)
        self.version, self.dtype = SHARD_FORMATS[self.magic]
        self.shard_names, self.shard, self.shard_count = [], None, 0
        self.tokens = self.documents = self.bytes = 0

    def write_document(self, tokens, text_bytes):
        self.documents += 1
        self.bytes += text_bytes
        self.write(tokens)

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.shard is None:
                name = f"{self.split}_{len(self.shard_names):06d}.bin"
                self.shard_names.append(name)
                self.shard, self.shard_count = AtomicFile(self.folder / name), 0
                self.shard.file.write(bytes(HEADER_BYTES))  # filled in by _finish_shard
            room = self.shard_tokens - self.shard_count
            self.shard.file.write(tokens[:room].tobytes())
            self.shard_count += len(tokens[:room])
            self.tokens += len(tokens[:room])
            tokens = tokens[room:]
            if self.shard_count == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self):
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = self.magic, self.version, self.shard_count
        self.shard.file.seek(0)
        self.shard.file.write(header.tobytes())
        self.shard.commit()
        self.shard = None

    def close(self):
        if self.shard is not None:
            self._finish_shard()
        return {"shards": self.shard_names, "tokens": self.tokens, "documents": self.documents,
                "bytes": self.bytes}

    def discard(self):
        if self.shard is not None:
            self.shard.discard()


def read_shard(path):
    """The tokens of an llm.c shard as a read-only memmap (uint16 or uint32)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte shard header")
    magic, version, token_count = (int(value) for value in np.fromfile(path, dtype="<i4", count=3))
    if magic not in SHARD_FORMATS:
        raise ShardError(f"{path}: bad magic number {magic}, expected 20240520 (uint16 tokens) "
                         f"or 20240801 (uint32 tokens): not a token shard")
    expected_version, dtype = SHARD_FORMATS[magic]
    if version != expected_version:
        raise ShardError(f"{path}: magic {magic} needs version {expected_version}, found {version}")
    expected_size = HEADER_BYTES + token_count * dtype.itemsize
    if size != expected_size:
        raise ShardError(f"{path}: the header says {token_count} tokens, so {expected_size} bytes, "
                         f"but the file has {size} bytes (truncated or corrupted)")
    if token_count == 0:  # mmap cannot map zero bytes
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(token_count,))


# ----------------------------------------------------------------------------- the folder
def folder_path(name):
    """A dataset name means data/<name>; anything with a slash is a path."""
    return Path(name) if "/" in name or os.sep in name else Path("data") / name


def open_folder(name):
    """The folder of a dataset name or path, checked to be a dataset folder."""
    folder = folder_path(name)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist: make it with "
                           f"`python prepare.py --out_dir={folder}` (or --name=... for data/<name>)")
    if not (folder / "meta.json").is_file():
        raise DatasetError(f"dataset folder {folder} has no meta.json: it is empty or was not made by prepare.py")
    return folder


def read_meta(folder):
    """meta.json of a dataset folder, parsed."""
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found: is {folder} a dataset folder written by "
                           f"prepare.py?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from None


def read_split(folder, meta, split, masks=False):
    """The split's shards, checked against meta.json: present, same dtype, same token count,
    every token id below vocab_size (found here, not as a device assert mid-run). masks=True:
    a chat dataset's mask shards instead, one per token shard, 1 where the loss counts the token."""
    info = meta["splits"][split]
    vocab_size = 2 if masks else meta["tokenizer"]["vocab_size"]
    shards = []
    for name in info["masks" if masks else "shards"]:
        path = Path(folder) / name
        if not path.is_file():
            raise DatasetError(f"{folder}/meta.json lists {name}, which is missing")
        tokens = read_shard(path)
        if not masks and tokens.dtype != np.dtype(meta["dtype"]):
            raise DatasetError(f"{path} holds {tokens.dtype} tokens but meta.json says {meta['dtype']}")
        if len(tokens) and int(tokens.max()) >= vocab_size:
            raise DatasetError(f"{path} holds token id {int(tokens.max())}, but the tokenizer has only "
                               f"{vocab_size} ids (0-{vocab_size - 1}): the shard does not belong to this meta.json")
        shards.append(tokens)
    found = sum(len(tokens) for tokens in shards)
    if found != info["tokens"]:
        raise DatasetError(f"{folder}/meta.json says the {split} split has {info['tokens']:,} tokens, "
                           f"its shards hold {found:,}")
    return shards


@contextmanager
def dataset_errors():
    """OS and value errors met while reading a dataset folder (their messages name the file)
    become DatasetErrors: one line for the user, no traceback."""
    try:
        yield
    except (ValueError, OSError) as error:  # a UserError is neither: it passes through as it is
        raise DatasetError(str(error)) from error


# ----------------------------------------------------------------------------- training windows
class TokenWindows:
    """Every window of block_size + 1 consecutive tokens inside the shards of one split: a
    window's first block_size tokens are a model input, its last block_size the targets.

    A window lies within one shard; window ids number them across the shards, so a batch
    is a handful of ids: random ones for training, evenly spaced fixed ones for evaluation.
    """

    def __init__(self, shards, block_size):
        self.shards = shards
        self.block_size = block_size
        self.window_ends = np.cumsum([max(0, len(tokens) - block_size) for tokens in shards])
        self.count = int(self.window_ends[-1]) if shards else 0

    def rows(self, window_ids):
        """The windows' tokens, (len(window_ids), block_size + 1) int64."""
        shard_of = np.searchsorted(self.window_ends, window_ids, side="right")
        rows = []
        for shard, window_id in zip(shard_of.tolist(), window_ids.tolist()):
            start = window_id - (int(self.window_ends[shard - 1]) if shard else 0)
            rows.append(self.shards[shard][start:start + self.block_size + 1])
        return np.stack(rows).astype(np.int64)

    def inputs_and_targets(self, window_ids):
        """(inputs, targets), each (len(window_ids), block_size) int64: a window and the same shifted by one."""
        rows = self.rows(window_ids)
        return rows[:, :-1], rows[:, 1:]

    def fixed_batch_ids(self, num_batches, batch_size):
        """num_batches batches of window ids spread evenly over the split: the same every time."""
        total = num_batches * batch_size
        return list((np.arange(total, dtype=np.int64) * self.count // total).reshape(num_batches, batch_size))


class ChatRows(TokenWindows):
    """A chat split's whole conversations packed into rows of block_size + 1 tokens.

    Each row starts at a conversation's start; conversations are placed largest first, each in
    the row it fills best (best-fit decreasing), so few positions are left over: those are
    end-of-text tokens whose targets are -1, as are the targets the mask leaves out (all but the
    assistant's). A conversation longer than a row is cut to its first block_size + 1 tokens
    (`cut` counts them). Row ids number the rows as window ids number windows."""

    def __init__(self, shards, masks, block_size, eot_id):
        tokens = np.concatenate(shards) if shards else np.zeros(0, dtype=np.uint16)
        trained = np.concatenate(masks).astype(bool) if masks else np.zeros(0, dtype=bool)
        width = block_size + 1
        starts = np.flatnonzero(tokens == eot_id)
        ends = np.append(starts[1:], len(tokens))
        lengths = np.minimum(ends - starts, width)
        self.block_size, self.conversations, self.cut = block_size, len(starts), int(np.sum(ends - starts > width))
        free, members = [], []  # free: sorted (room left, row); members[row]: its conversations
        for index in sorted(range(len(starts)), key=lambda index: (-lengths[index], index)):
            place = bisect.bisect_left(free, (int(lengths[index]), -1))
            if place == len(free):
                members.append([])
                room, row = width, len(members) - 1
            else:
                room, row = free.pop(place)
            members[row].append(index)
            bisect.insort(free, (room - int(lengths[index]), row))
        self.tokens = np.full((len(members), width), eot_id, dtype=np.int64)
        self.trained = np.zeros((len(members), width), dtype=bool)
        for row, indexes in enumerate(members):
            position = 0
            for index in indexes:
                length, start = int(lengths[index]), int(starts[index])
                self.tokens[row, position:position + length] = tokens[start:start + length]
                self.trained[row, position:position + length] = trained[start:start + length]
                position += length
        self.count = len(members)
        self.filled = float(lengths.sum() / max(self.tokens.size, 1))  # share of positions holding conversations

    def rows(self, window_ids):
        return self.tokens[window_ids]

    def inputs_and_targets(self, window_ids):
        """(inputs, targets) as TokenWindows gives them, targets -1 where the loss does not count."""
        rows, trained = self.tokens[window_ids], self.trained[window_ids]
        return rows[:, :-1], np.where(trained[:, 1:], rows[:, 1:], -1)


def load_windows(folder, meta, split, block_size):
    """The split's windows of block_size + 1 tokens (read_split checks the shards), or for a
    chat dataset its rows of packed conversations."""
    shards = read_split(folder, meta, split)
    if meta.get("chat"):
        masks = read_split(folder, meta, split, masks=True)
        rows = ChatRows(shards, masks, block_size, meta["tokenizer"]["eot_id"])
        if rows.count == 0:
            raise DatasetError(f"the {split} split of {folder} holds no conversations")
        return rows
    windows = TokenWindows(shards, block_size)
    if windows.count == 0:
        longest = max((len(tokens) for tokens in shards), default=0)
        raise DatasetError(f"block_size={block_size} needs shards of at least {block_size + 1} tokens, but the "
                           f"longest {split} shard of {folder} has {longest}: lower block_size or give the "
                           f"{split} split more text")
    return windows


# ----------------------------------------------------------------------------- building one
def start_build(final, keep):
    """A hidden sibling of the final folder to build in: data/.<name>.partial. What an
    earlier failed build left under the names in keep stays (downloads, say); anything
    else there is cleared. A final folder that is not a dataset is never replaced."""
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / "meta.json").exists())):
        raise DatasetError(f"{final} exists and is not a dataset folder (no meta.json): "
                           f"refusing to replace it; choose another --name or --out_dir")
    build = build_folder(final)
    build.mkdir(parents=True, exist_ok=True)
    clear_build(build, keep)
    return build


def build_folder(final):
    return final.parent / f".{final.name}.partial"


def clear_build(build, keep):
    for entry in build.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def discard_build(build, keep):
    """Removes a failed build but for the non-empty folders named in keep, for the next
    run to reuse or go on from."""
    clear_build(build, keep)
    for name in keep:
        if (build / name).is_dir() and not any((build / name).iterdir()):
            (build / name).rmdir()
    if not any(build.iterdir()):
        build.rmdir()


def publish(build, final):
    """Renames the finished build onto the final name (replacing an older dataset)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(build, final)
        shutil.rmtree(old)
    else:
        os.rename(build, final)
    fsync_folder(final.parent)


# ----------------------------------------------------------------------------- report.md
def report_markdown(meta, name):
    """report.md: meta.json told for people: what was read, what each filter dropped and
    why (with examples), the tokenizer, the splits and the timings."""
    documents, tokenizer = meta["documents"], meta["tokenizer"]
    lines = [f"# Dataset {name}", "", "## Sources", ""]
    lines += [f"- {json.dumps(source)}" for source in meta["sources"]]
    lines += ["", "## Documents", "", "| | documents |", "|---|---:|",
              f"| read | {documents['read']:,} ({documents['bytes_read'] / 1e6:,.2f} MB) |",
              f"| kept | {documents['kept']:,} |"]
    lines += [f"| dropped: {reason} | {count:,} |" for reason, count in meta["dropped"].items()]
    lines += ["", f"Filters, in order: {', '.join(meta['filters'])}.",
              f"Documents with bytes that were not UTF-8 (decoded with U+FFFD): {documents['invalid_utf8']:,}."]
    lines += filter_section(meta) + kept_section(meta)
    lines += ["", "## Tokenizer", "",
              f"{tokenizer['kind']}, {tokenizer['vocab_size']:,} tokens, end-of-text id "
              f"{tokenizer['eot_id']}, {meta['dtype']} shards, {meta['bytes_per_token']} bytes per token.",
              *([tokenizer["note"][0].upper() + tokenizer["note"][1:] + "."] if tokenizer.get("note") else []),
              "", "## Splits", "", f"Val is {meta['split_rule']['why']}.", "",
              "| split | documents | tokens | MB | shards |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {split} | {summary['documents']:,} | {summary['tokens']:,} | "
              f"{summary['bytes'] / 1e6:,.2f} | {len(summary['shards'])} |"
              for split, summary in meta["splits"].items()]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:,.2f} |" for stage, seconds in meta["timings_s"].items()]
    rates = meta["throughput"]
    lines += ["", f"With {meta['settings']['num_workers']} worker(s): filtering ran at "
                  f"{rates['filter']['documents_per_s']:,.0f} documents/s, {rates['filter']['mb_per_s']:,.2f} "
                  f"MB/s; tokenizing at {rates['shards']['mb_per_s']:,.2f} MB/s; the whole run at "
                  f"{rates['total']['mb_per_s']:,.2f} MB/s of text read."]
    return "\n".join(lines) + "\n"


def filter_section(meta):
    """Per filter: how many documents it dropped, by which rules, and the start of the
    first ones it dropped (emails and IPs masked), so that a reader can judge and tune it."""
    read = max(meta["documents"]["read"], 1)
    by_filter = defaultdict(dict)
    for reason, count in meta["dropped"].items():
        by_filter[reason.partition(":")[0]][reason] = count
    lines = ["", "## What each filter dropped", ""]
    if not by_filter:
        return lines + ["Nothing was dropped."]
    lines += ["Shares are of the documents read. A web filter's switch and thresholds are "
              "flags (python prepare.py --help)."]
    for name, reasons in by_filter.items():
        count = sum(reasons.values())
        rules = ", ".join(f"{reason} {number:,}" for reason, number in reasons.items())
        lines += ["", f"### {name}: {count:,} ({count / read:.1%})", "", f"{rules}."]
        examples = meta["dropped_examples"].get(name, [])
        if examples:
            fence = "```"
            lines += ["", fence, *(example.replace(fence, "'''") for example in examples), fence]
    return lines


def kept_section(meta):
    """The kept documents' languages and top domains, for web text (WET headers)."""
    if not meta["top_domains"] and list(meta["kept_languages"]) == ["unknown"]:
        return []
    languages = ", ".join(f"{language} {count:,}" for language, count in meta["kept_languages"].items())
    lines = ["", "## Kept documents", "", f"Languages (the first of the WET header's): {languages}."]
    if meta["top_domains"]:
        lines += ["", "| top domains | documents |", "|---|---:|"]
        lines += [f"| {domain} | {count:,} |" for domain, count in meta["top_domains"].items()]
    return lines
