"""prepare.py: raw text in, a dataset folder out (tokenizer, binary token shards, manifest).

    python prepare.py                       # this Python's standard library -> data/python/
    python prepare.py --source=files --input=notes/,books/*.txt --name=mine
    python prepare.py --source=url --url=https://example.org/book.txt --tokenizer=byte
    python prepare.py --help                # every flag with its default

The flow, one stage after another:
  sources   documents (id, text, metadata) from the stdlib, local files or URLs
  filters   each document is kept (maybe cleaned) or dropped with a reason, counted
  split     a hash of the document id puts a fixed fraction of documents in val
  tokenizer a byte-level BPE trained here on the train documents (or byte / gpt2)
  shards    documents tokenized on all cores, written as llm.c-style .bin shards
  manifest  meta.json (read by train.py) and report.md (read by people)

The dataset is built in a hidden sibling folder and renamed into place only when
complete, so data/<name>/ is always either the previous dataset or the new one.
train.py and sample.py import the dataset-folder API from here: EOT, load_tokenizer,
read_shard, read_meta, atomic_write.
"""
import base64
import difflib
import glob
import gzip
import hashlib
import heapq
import json
import os
import platform
import posixpath
import re
import secrets
import shutil
import sys
import sysconfig
import time
import unicodedata
import urllib.parse
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import requests
import tiktoken


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Every flag, its default and what it does (`--help` prints this table).
FLAGS = {
    "source": ("python", "where the text comes from: python (this Python's standard library, "
                         "offline), files (--input) or url (--url)"),
    "input": ("", "files source: comma-separated files, folders and globs of "
                  ".txt .md .rst .py .jsonl .warc.wet .warc.wet.gz"),
    "val_input": ("", "files whose documents form the val split (instead of --val_fraction)"),
    "url": ("", "url source: comma-separated http(s) URLs of plain text, .jsonl or .warc.wet.gz"),
    "text_field": ("text", "the field of each .jsonl line that holds the document's text"),
    "tokenizer": ("bpe", "bpe (trained here on the corpus), byte (256 bytes + end-of-text) "
                         "or gpt2 (tiktoken's; needs the network once)"),
    "vocab_size": (8192, "bpe only: tokens in the vocabulary, counting the 256 bytes and "
                         "the end-of-text token"),
    "tokenizer_train_chars": (20_000_000, "bpe only: train on at most this many characters "
                                          "of the train documents"),
    "shard_tokens": (100_000_000, "tokens per shard file (the last shard holds the rest)"),
    "val_fraction": (0.05, "fraction of documents held out for val, picked by a hash of "
                           "each document's id"),
    "num_workers": (_cpu_count(), "processes that tokenize (the shards are the same for any number)"),
    "name": ("", "dataset name: writes data/<name>/ (default: the source's name)"),
    "out_dir": ("", "write the dataset to this folder instead of data/<name>/"),
}
SOURCES = ("python", "files", "url")
TOKENIZERS = ("bpe", "byte", "gpt2")


class PrepareError(Exception):
    """Bad input or settings: the message says what was found and what was expected."""


# ----------------------------------------------------------------------------------------
# The dataset folder: the API that train.py and sample.py import

EOT = "<|endoftext|>"
META_FORMAT_VERSION = 1
HEADER_INTS = 256  # llm.c shard header: 256 little-endian int32, [magic, version, tokens, 0...]
HEADER_BYTES = HEADER_INTS * 4
SHARD_FORMATS = {  # magic -> (version, token dtype), as llm.c and modded-nanogpt write them
    20240520: (1, np.dtype("<u2")),
    20240801: (7, np.dtype("<u4")),
}


class ShardError(ValueError):
    """A token shard that does not follow the llm.c format (the message names the file)."""


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
        self.file.close()
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
    except BaseException:
        target.discard()
        raise
    target.commit()


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


def read_meta(folder):
    """meta.json of a dataset folder, parsed."""
    path = Path(folder) / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: is {folder} a dataset folder written by "
                                f"prepare.py?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_tokenizer(folder, tokenizer_info=None):
    """The tiktoken.Encoding described by tokenizer_info (meta.json's "tokenizer" entry,
    read from folder/meta.json when None); a trained BPE's file is read from folder."""
    info = tokenizer_info if tokenizer_info is not None else read_meta(folder)["tokenizer"]
    kind = info["kind"]
    if kind == "bpe":
        encoder = _encoding("owngpt-bpe", read_tiktoken_file(Path(folder) / info["file"], info["sha256"]))
    elif kind == "byte":
        encoder = _encoding("owngpt-byte", [bytes([value]) for value in range(256)])
    elif kind == "gpt2":
        encoder = _gpt2_encoding()
    else:
        raise ValueError(f"{folder}: unknown tokenizer kind {kind!r}, expected one of {TOKENIZERS}")
    if (encoder.n_vocab, encoder.eot_token) != (info["vocab_size"], info["eot_id"]):
        raise ValueError(f"{folder}: the {kind} tokenizer has {encoder.n_vocab} tokens and end-of-text "
                         f"id {encoder.eot_token}, but its description says {info['vocab_size']} "
                         f"and {info['eot_id']}")
    return encoder


def _encoding(name, vocabulary):
    """tiktoken encoding: the tokens in rank order, then the end-of-text special token."""
    return tiktoken.Encoding(
        f"{name}-{len(vocabulary) + 1}", pat_str=SPLIT_PATTERN,
        mergeable_ranks={token: rank for rank, token in enumerate(vocabulary)},
        special_tokens={EOT: len(vocabulary)})


def _gpt2_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as error:  # requests' errors are OSErrors
        raise ConnectionError(
            f"the gpt2 tokenizer needs the network the first time (tiktoken downloads its files "
            f"and caches them), and the download failed: {error}. Offline, use --tokenizer=bpe "
            f"or --tokenizer=byte.") from None


def read_tiktoken_file(path, sha256):
    """The token byte strings of a tokenizer.tiktoken file (`base64(token) rank` per line),
    checked against the sha256 recorded when it was written."""
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"{path}: sha256 is {actual} but the dataset recorded {sha256}: the "
                         f"tokenizer file was changed or belongs to another dataset")
    vocabulary = []
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            token, rank = line.split()
            vocabulary.append(base64.b64decode(token, validate=True))
            valid = int(rank) == number - 1
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"{path}:{number}: expected 'base64-token {number - 1}', found {line[:60]!r}")
    return vocabulary


def write_tiktoken_file(path, vocabulary):
    """Writes tiktoken's own format, so tiktoken.load.load_tiktoken_bpe reads it too."""
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(vocabulary))
    atomic_write(path, lambda f: f.write(lines))
    return hashlib.sha256(lines).hexdigest()


# ----------------------------------------------------------------------------------------
# Sources: every source is a list of input files, each read into documents

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
               "__pycache__", "pydoc_data"}


@dataclass
class Document:
    id: str  # stable and unique: it names the document and decides its split
    text: str
    metadata: dict = field(default_factory=dict)  # where it came from (file, line, WARC headers)
    invalid_utf8: bool = False  # some bytes were not UTF-8 and became U+FFFD


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # how its documents are named: a relative path, the path given, or the URL
    kind: str  # text (one document), jsonl (one per line), wet (one per record), pydoc_topics


def input_kind(file_name):
    """The reader for a file name, or None when the type is not supported."""
    if file_name.endswith((".warc.wet", ".warc.wet.gz")):
        return "wet"
    if file_name.endswith(".jsonl"):
        return "jsonl"
    if file_name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


def walk_files(folder, skip=()):
    """Every file under folder in sorted order, leaving out hidden and skipped folders."""
    for parent, folders, files in os.walk(folder, onerror=raise_error):
        folders[:] = sorted(name for name in folders if name not in skip and not name.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(parent) / name


def raise_error(error):
    raise error  # os.walk would skip an unreadable folder silently


def python_inputs():
    """The running Python's standard library: module sources (no test suites, no IDLE, no
    installed packages) and the documentation topics that `help()` shows."""
    root = Path(sysconfig.get_paths()["stdlib"])
    inputs = [InputFile(path, path.relative_to(root).as_posix(), "text")
              for path in walk_files(root, skip=STDLIB_SKIP) if path.suffix == ".py"]
    topics = root / "pydoc_data" / "topics.py"
    if topics.exists():
        inputs.append(InputFile(topics, "pydoc_data/topics", "pydoc_topics"))
    source = {"kind": "python", "python": platform.python_version(), "stdlib": str(root),
              "files": len(inputs)}
    return inputs, source


def file_inputs(spec, flag="input"):
    """The files named by a comma-separated list of paths, folders and globs."""
    paths, skipped = [], 0
    for item in split_list(spec):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise PrepareError(f"--{flag}: {item!r} matches no files")
        elif os.path.exists(item):
            matches = [item]
        else:
            raise PrepareError(f"--{flag}: no such file or folder: {item}")
        for match in map(Path, matches):
            if match.is_dir():
                found = list(walk_files(match, skip={"__pycache__"}))
                supported = [path for path in found if input_kind(path.name)]
                skipped += len(found) - len(supported)
                paths += supported
            elif input_kind(match.name):
                paths.append(match)
            elif not glob.has_magic(item):
                raise PrepareError(f"--{flag}: {match} is not a supported file type; expected "
                                   f"{', '.join(TEXT_SUFFIXES)}, .jsonl, .warc.wet or .warc.wet.gz")
            else:
                skipped += 1
    unique = list(dict.fromkeys(paths))  # a file named twice is read once
    inputs = [InputFile(path, path.as_posix(), input_kind(path.name)) for path in unique]
    return inputs, {"kind": "files", "input": spec, "files": len(inputs), "skipped_files": skipped}


def split_list(spec):
    return [item.strip() for item in spec.split(",") if item.strip()]


def read_documents(input_file, text_field):
    """The documents of one input file, in file order."""
    readers = {"text": read_text, "jsonl": read_jsonl, "wet": read_wet, "pydoc_topics": read_pydoc_topics}
    try:
        yield from readers[input_file.kind](input_file, text_field)
    except (OSError, EOFError, ValueError) as error:
        raise PrepareError(f"cannot read {input_file.name}: {error}") from None


def decode_utf8(data):
    """Text and whether some bytes were not UTF-8 (those become U+FFFD)."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def read_text(input_file, text_field):
    text, invalid = decode_utf8(input_file.path.read_bytes())
    yield Document(input_file.name, text, {"file": input_file.name}, invalid)


def read_jsonl(input_file, text_field):
    with open(input_file.path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text, invalid = decode_utf8(line)
            where = f"{input_file.name}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise PrepareError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise PrepareError(f"{where}: expected a JSON object with a string field "
                                   f"{text_field!r} (--text_field), found {found}")
            yield Document(where, record[text_field], {"file": input_file.name, "line": number}, invalid)


def read_wet(input_file, text_field):
    """One document per `conversion` record (the extracted text of one web page); its WARC
    headers (WARC-Target-URI, WARC-Date, WARC-Identified-Content-Language, ...) become the
    document's metadata. Common Crawl gzips each record as its own gzip member, which
    gzip reads as one stream."""
    opener = gzip.open if input_file.path.name.endswith(".gz") else open
    with opener(input_file.path, "rb") as stream:
        for number, (headers, body) in enumerate(iter_warc_records(stream), start=1):
            if headers.get("WARC-Type") == "conversion":
                text, invalid = decode_utf8(body)
                metadata = {"file": input_file.name, "record": number, **headers}
                yield Document(f"{input_file.name}:{number}", text, metadata, invalid)


def iter_warc_records(stream):
    """(headers, body bytes) for each record of a WARC file read from a binary stream:
    a 'WARC/1.0' line, 'Name: value' header lines, a blank line, Content-Length bytes."""
    while line := stream.readline():
        if not line.strip():
            continue  # the blank lines that end the previous record
        if not line.startswith(b"WARC/"):
            raise ValueError(f"expected a WARC record starting with 'WARC/', found {line[:40]!r}")
        headers = {}
        while (line := stream.readline()).strip():
            name, _, value = line.decode("utf-8", errors="replace").partition(":")
            headers[name.strip()] = value.strip()
        length = headers.get("Content-Length", "")
        if not length.isdigit():
            raise ValueError(f"WARC record {headers.get('WARC-Record-ID')} has no valid Content-Length")
        body = stream.read(int(length))
        if len(body) < int(length):
            raise EOFError(f"WARC record {headers.get('WARC-Record-ID')} is cut short: "
                           f"{len(body)} of {length} bytes")
        yield headers, body


def read_pydoc_topics(input_file, text_field):
    from pydoc_data.topics import topics
    for topic in sorted(topics):
        yield Document(f"{input_file.name}:{topic}", topics[topic], {"file": input_file.name})


# ----------------------------------------------------------------------------------------
# Downloads (the url source)

DOWNLOAD_ATTEMPTS = 5  # tries in a row that make no progress before giving up
RETRY_STATUSES = {429, 500, 502, 503, 504}
TIMEOUT_S = (10, 60)  # (connect, between bytes)
# Reads of 64 KiB: when a transfer breaks, requests drops the block being read, so small
# blocks keep most of what arrived for the Range request that resumes it.
DOWNLOAD_BLOCK = 1 << 16


class RetryableError(Exception):
    """A failure worth another try: the network, a server error, a cut-off transfer."""

    def __init__(self, message, wait_s=0):
        super().__init__(message)
        self.wait_s = wait_s  # what the server asked for in Retry-After


def download_name(url):
    """A file name for url that cannot leave the downloads folder: a hash of the URL and
    the last path segment reduced to safe characters."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PrepareError(f"--url: {url!r} is not an http(s) URL")
    last = re.sub(r"[^A-Za-z0-9._-]", "_", posixpath.basename(parts.path))[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{last or 'index'}"


def url_inputs(spec, downloads, previous_downloads):
    urls = split_list(spec)
    names = [download_name(url) for url in urls]  # checks every URL before downloading any
    downloads.mkdir(exist_ok=True)
    inputs, sources = [], []
    for url, name in zip(urls, names):
        path = downloads / name
        if not path.exists() and (previous_downloads / name).exists():
            link_or_copy(previous_downloads / name, path)
        if not path.exists():
            download(url, path)
        inputs.append(InputFile(path, url, input_kind(name) or "text"))
        sources.append({"kind": "url", "url": url, "file": f"downloads/{name}",
                        "bytes": path.stat().st_size})
    return inputs, sources


def link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def download(url, path):
    """Fetches url into path through path.part, resuming after a broken transfer and
    retrying with exponential backoff while tries keep failing."""
    partial = path.with_name(path.name + ".part")
    failures = 0
    while True:
        had = partial.stat().st_size if partial.exists() else 0
        try:
            fetch(url, partial)
            os.replace(partial, path)
            return
        except RetryableError as error:
            made_progress = partial.exists() and partial.stat().st_size > had
            failures = 0 if made_progress else failures + 1
            if failures >= DOWNLOAD_ATTEMPTS:
                raise PrepareError(f"download failed after {DOWNLOAD_ATTEMPTS} tries: {error}") from None
            wait_s = 0 if made_progress else max(2 ** (failures - 1), error.wait_s)
            print(f"download: {error}; retrying in {wait_s} s", file=sys.stderr)
            time.sleep(wait_s)


def fetch(url, partial):
    """One request: appends to partial with a Range request when it already holds a prefix."""
    offset = partial.stat().st_size if partial.exists() else 0
    # identity: a compressed transfer would not match Content-Length or byte ranges
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={offset}-"} if offset else {})}
    try:
        with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code in RETRY_STATUSES:
                retry_after = response.headers.get("Retry-After", "")
                wait_s = min(int(retry_after), 60) if retry_after.isdigit() else 0
                raise RetryableError(f"{url} answered {response.status_code} {response.reason}", wait_s)
            if response.status_code == 416 and offset:  # nothing past what we have: start over
                partial.unlink()
                raise RetryableError(f"{url} refused to resume at byte {offset}")
            if response.status_code >= 400:
                raise PrepareError(f"download failed: {url} answered {response.status_code} {response.reason}")
            resumed = response.status_code == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                partial.unlink()
                raise RetryableError(f"{url} sent the wrong range {response.headers.get('Content-Range')}")
            expected = expected_size(response, offset if resumed else 0)
            progress = Progress("download", "MB", expected / 1e6 if expected else None)
            with open(partial, "ab" if resumed else "wb") as out:
                for block in response.iter_content(DOWNLOAD_BLOCK):
                    out.write(block)
                    progress.update(out.tell() / 1e6)
                size = out.tell()
            progress.finish(size / 1e6)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as error:
        raise RetryableError(f"{url}: {error}") from None
    if expected is not None and size != expected:
        raise RetryableError(f"{url}: transfer stopped at {size} of {expected} bytes")


def expected_size(response, offset):
    length = response.headers.get("Content-Length", "")
    return offset + int(length) if length.isdigit() else None


# ----------------------------------------------------------------------------------------
# Filters. Per-document filters take a document and return it (maybe with cleaned text)
# or the reason to drop it; they run in the worker processes. Deduplication needs every
# earlier document, so a worker computes a key and the main process checks it in order.

def drop_empty(document):
    return "empty" if not document.text.strip() else document


# The per-document filters, in order. Code and local text get only what suits any text;
# web text filters (language, quality, repetition, line cleanup, masking) plug in here.
DOCUMENT_FILTERS = (drop_empty,)


def clean_document(document):
    """The document after every per-document filter, or the reason one of them dropped it."""
    for keep_or_drop in DOCUMENT_FILTERS:
        document = keep_or_drop(document)
        if isinstance(document, str):
            break
    return document


class ExactDeduplicator:
    """Drops a text seen before in this run; remembers 16 bytes per kept document."""

    def __init__(self):
        self.seen = set()

    @staticmethod
    def key(text):
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def check(self, key):
        if key in self.seen:
            return "duplicate"
        self.seen.add(key)
        return None


@dataclass
class Tally:
    """What was read and dropped, for meta.json and report.md."""
    documents_read: int = 0
    bytes_read: int = 0
    invalid_utf8: int = 0
    dropped: Counter = field(default_factory=Counter)


def split_of(document_id, val_fraction):
    """'val' for a fixed, pseudo-random val_fraction of document ids, else 'train'."""
    digest = hashlib.sha256(document_id.encode("utf-8", "surrogatepass")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2 ** 64 else "train"


def labelled_documents(settings, inputs, val_inputs, tally):
    """(split, document) for every document read, in a fixed order."""
    parts = [("train", inputs), ("val", val_inputs)] if val_inputs else [(None, inputs)]
    for split, files in parts:
        for input_file in files:
            for document in read_documents(input_file, settings["text_field"]):
                tally.documents_read += 1
                tally.bytes_read += len(document.text.encode("utf-8", "surrogatepass"))
                tally.invalid_utf8 += document.invalid_utf8
                yield split or split_of(document.id, settings["val_fraction"]), document


# ----------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on the train documents

# GPT-4's split pattern (tiktoken's cl100k_base). Text is cut into chunks (a word with its
# leading space, up to 3 digits, a run of punctuation, whitespace) and BPE never merges
# across chunks, so no token spans the end of one word and the start of the next.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# Unicode's White_Space property: \s in tiktoken's regex engine (Python's \s adds \x1c-\x1f)
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200b))) + \
              "\u2028\u2029\u202f\u205f\u3000"


@cache
def python_split_regex():
    """SPLIT_PATTERN for Python's re, which has no \\p{L} (letters) or \\p{N} (numbers).

    tiktoken runs SPLIT_PATTERN in Rust when encoding; the trainer runs this translation,
    whose classes are built from unicodedata, so both cut text into the same chunks
    (except for characters newer than this Python's Unicode database)."""
    kinds = "".join(map(_char_kind, map(chr, range(sys.maxunicode + 1))))
    translations = {r"[^\r\n\p{L}\p{N}]": "SO", r"[^\s\p{L}\p{N}]": "O", r"\p{L}": "L",
                    r"\p{N}": "N", r"\s": "SR", r"\S": "LNO"}
    classes = {key: _char_class(kinds, wanted) for key, wanted in translations.items()}
    classes["$"] = r"\Z"  # end of text; Python's $ would also match before a final newline
    translated = re.sub("|".join(map(re.escape, classes)), lambda match: classes[match.group()], SPLIT_PATTERN)
    return re.compile(translated)


def _char_kind(char):
    """L letter, N number, R \\r or \\n, S other white space, O anything else."""
    if char in "\r\n":
        return "R"
    if char in WHITE_SPACE:
        return "S"
    category = unicodedata.category(char)[0]
    return category if category in "LN" else "O"


def _char_class(kinds, wanted):
    """A regex matching the code points whose kind letter is in wanted."""
    spans = [(match.start(), match.end() - 1) for match in re.finditer(f"[{wanted}]+", kinds)]
    bmp = [(start, min(end, 0xFFFF)) for start, end in spans if start <= 0xFFFF]
    astral = [(max(start, 0x10000), end) for start, end in spans if end > 0xFFFF]
    brackets = lambda spans: "[" + "".join(f"{re.escape(chr(start))}-{re.escape(chr(end))}" for start, end in spans) + "]"
    if not astral:
        return brackets(bmp)
    # re tests BMP characters against a bitmap but scans characters past U+FFFF one range
    # at a time; the lookahead keeps the common BMP characters out of that scan (5x faster)
    return f"(?:{brackets(bmp)}|(?=[\U00010000-\U0010FFFF]){brackets(astral)})"


def count_chunks(texts):
    """How often each chunk (see SPLIT_PATTERN) occurs in texts."""
    split = python_split_regex()
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    return chunk_counts


def train_bpe(chunk_counts, vocab_size, progress=None):
    """Byte-level BPE: the vocabulary (token bytes in rank order) of vocab_size - 1 tokens;
    the end-of-text token comes last. Each step merges the most frequent adjacent pair of
    tokens (ties: the smallest pair of ids), counted inside chunks and weighted by how
    often each chunk occurs; a pair must occur at least twice."""
    vocabulary = [bytes([value]) for value in range(256)]
    token_ids = {token: token_id for token_id, token in enumerate(vocabulary)}
    words = [list(chunk.encode("utf-8", "surrogatepass")) for chunk in chunk_counts]
    word_counts = list(chunk_counts.values())
    pair_counts, pair_words = defaultdict(int), defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += word_counts[index]
            pair_words[pair].add(index)
    # A max-heap of (-count, pair). A merge only lowers the counts of the pairs around it,
    # except those with the new token, which are pushed afresh; so every entry is an upper
    # bound: a stale top entry goes back with its current count, and the first entry that
    # is up to date is the true maximum.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    target = vocab_size - 1
    while len(vocabulary) < target and heap:
        negative_count, pair = heapq.heappop(heap)
        count = pair_counts[pair]
        if count != -negative_count:
            if count:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < 2:
            break
        merged = vocabulary[pair[0]] + vocabulary[pair[1]]
        if merged not in token_ids:  # a byte string reached by two merges keeps one id
            token_ids[merged] = len(vocabulary)
            vocabulary.append(merged)
        for new_pair in merge_pair(pair, token_ids[merged], words, word_counts, pair_counts, pair_words):
            heapq.heappush(heap, (-pair_counts[new_pair], new_pair))
        if progress:
            progress.update(len(vocabulary) - 256)
    if len(vocabulary) < target:
        raise PrepareError(
            f"--vocab_size={vocab_size} is more than this text supports: after "
            f"{len(vocabulary) - 256} merges no pair of tokens occurs twice. Use at most "
            f"--vocab_size={len(vocabulary) + 1}, or train on more text (more input, or a "
            f"larger --tokenizer_train_chars).")
    return vocabulary


def merge_pair(pair, new_id, words, word_counts, pair_counts, pair_words):
    """Replaces pair by new_id in the words that hold it and updates the pair counts of
    just those words; returns the pairs whose counts grew (they all contain new_id)."""
    grown = set()
    for index in pair_words.pop(pair):
        word = words[index]
        merged = merge_word(word, pair, new_id)
        if len(merged) == len(word):
            continue  # a stale entry: an earlier merge already took this pair apart
        count = word_counts[index]
        for old_pair in zip(word, word[1:]):
            pair_counts[old_pair] -= count
        for new_pair in zip(merged, merged[1:]):
            pair_counts[new_pair] += count
            if new_id in new_pair:
                pair_words[new_pair].add(index)
                grown.add(new_pair)
        words[index] = merged
    return grown


def merge_word(word, pair, new_id):
    """word with every occurrence of pair, left to right, replaced by new_id."""
    first, second = pair
    merged, position, last = [], 0, len(word) - 1
    while position <= last:
        if position < last and word[position] == first and word[position + 1] == second:
            merged.append(new_id)
            position += 2
        else:
            merged.append(word[position])
            position += 1
    return merged


def training_texts(settings, inputs, val_inputs, progress):
    """The kept train documents' texts, up to --tokenizer_train_chars characters in all."""
    budget, used, deduplicator = settings["tokenizer_train_chars"], 0, ExactDeduplicator()
    for split, document in labelled_documents(settings, inputs, val_inputs, Tally()):
        document = clean_document(document)
        if isinstance(document, str) or deduplicator.check(deduplicator.key(document.text)):
            continue
        if split == "train":
            text = document.text[:budget - used]
            used += len(text)
            progress.update(used / 1e6)
            yield text
            if used == budget:
                return


def build_tokenizer(settings, inputs, val_inputs, folder, total_mb, timings):
    """Trains or fetches the tokenizer; returns meta.json's tokenizer entry."""
    kind = settings["tokenizer"]
    if kind == "byte":
        return {"kind": "byte", "vocab_size": 257, "eot_id": 256, "file": None, "sha256": None}
    if kind == "gpt2":
        encoder = _gpt2_encoding()
        return {"kind": "gpt2", "vocab_size": encoder.n_vocab, "eot_id": encoder.eot_token,
                "file": None, "sha256": None}
    start = time.perf_counter()
    budget_m = settings["tokenizer_train_chars"] / 1e6
    progress = Progress("bpe text", "M chars", min(budget_m, total_mb) if total_mb else budget_m)
    chunk_counts = count_chunks(training_texts(settings, inputs, val_inputs, progress))
    chars = sum(len(chunk) * count for chunk, count in chunk_counts.items())  # chunks cover the text
    progress.finish(chars / 1e6, f"{len(chunk_counts):,} unique chunks")
    timings["tokenizer_count"] = time.perf_counter() - start
    start = time.perf_counter()
    progress = Progress("bpe", "merges", settings["vocab_size"] - 257)
    vocabulary = train_bpe(chunk_counts, settings["vocab_size"], progress)
    progress.finish(len(vocabulary) - 256)
    timings["tokenizer_merges"] = time.perf_counter() - start
    sha256 = write_tiktoken_file(folder / "tokenizer.tiktoken", vocabulary)
    return {"kind": "bpe", "vocab_size": settings["vocab_size"], "eot_id": len(vocabulary),
            "file": "tokenizer.tiktoken", "sha256": sha256}


# ----------------------------------------------------------------------------------------
# Shards: tokenize on all cores, stream tokens into llm.c .bin files

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # a task for a worker process: about 1M characters
BATCH_DOCUMENTS = 128  # or this many documents, so that many small ones still spread out


class ShardWriter:
    """Streams one split's tokens into shards of shard_tokens tokens each (the last one
    shorter); each shard is an AtomicFile whose header is filled in when it is full."""

    def __init__(self, folder, split, vocab_size, shard_tokens):
        self.folder, self.split, self.shard_tokens = Path(folder), split, shard_tokens
        # uint16 holds ids below 65536; larger vocabularies need llm.c's uint32 format
        self.magic = 20240520 if vocab_size <= 2 ** 16 else 20240801
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


_worker = None  # (encoder, shard dtype) in each worker process


def _start_worker(folder, tokenizer_info, dtype):
    global _worker
    _worker = load_tokenizer(folder, tokenizer_info), dtype


def _process_documents(documents):
    """For each document: (drop reason, None, None, 0) or (None, dedup key, tokens, text
    bytes), where the tokens start with the end-of-text token that begins every document."""
    encoder, dtype = _worker
    results = []
    for document in documents:
        document = clean_document(document)
        if isinstance(document, str):
            results.append((document, None, None, 0))
            continue
        # disallowed_special=() encodes a literal "<|endoftext|>" in the text as plain text
        ids = encoder.encode_to_numpy(document.text, disallowed_special=())
        tokens = np.empty(len(ids) + 1, dtype=dtype)
        tokens[0] = encoder.eot_token
        tokens[1:] = ids
        text_bytes = len(document.text.encode("utf-8", "surrogatepass"))
        results.append((None, ExactDeduplicator.key(document.text), tokens, text_bytes))
    return results


def batches_of(labelled):
    """Lists of (split, document) of about BATCH_CHARS characters or BATCH_DOCUMENTS documents."""
    batch, chars = [], 0
    for split, document in labelled:
        batch.append((split, document))
        chars += len(document.text)
        if chars >= BATCH_CHARS or len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def processed_batches(batches, folder, tokenizer_info, dtype, num_workers):
    """(batch, its results) in input order, computed by num_workers processes.
    At most two batches per worker are in flight, so memory stays bounded."""
    documents = lambda batch: [document for _, document in batch]
    if num_workers == 1:
        _start_worker(folder, tokenizer_info, dtype)
        for batch in batches:
            yield batch, _process_documents(documents(batch))
        return
    with ProcessPoolExecutor(num_workers, initializer=_start_worker,
                             initargs=(folder, tokenizer_info, dtype)) as pool:
        in_flight = deque()
        for batch in batches:
            in_flight.append((batch, pool.submit(_process_documents, documents(batch))))
            if len(in_flight) > 2 * num_workers:
                batch, future = in_flight.popleft()
                yield batch, future.result()
        for batch, future in in_flight:
            yield batch, future.result()


def write_shards(settings, inputs, val_inputs, folder, tokenizer_info, total_mb):
    """Filters and tokenizes every document into the train and val shards; returns the
    splits' summaries and the tally of what was read and dropped."""
    tally, deduplicator = Tally(), ExactDeduplicator()
    writers = {split: ShardWriter(folder, split, tokenizer_info["vocab_size"], settings["shard_tokens"])
               for split in SPLITS}
    # Each split's latest document waits until the next one arrives, so that at the end
    # a split left empty by the hash (a tiny corpus) can take the other split's last one.
    held = {}
    progress = Progress("shards", "MB", total_mb)
    batches = batches_of(labelled_documents(settings, inputs, val_inputs, tally))
    try:
        for batch, results in processed_batches(batches, folder, tokenizer_info, writers["train"].dtype,
                                                settings["num_workers"]):
            for (split, _), (reason, key, tokens, text_bytes) in zip(batch, results):
                reason = reason or deduplicator.check(key)
                if reason:
                    tally.dropped[reason] += 1
                    continue
                if split in held:
                    writers[split].write_document(*held[split])
                held[split] = tokens, text_bytes
            progress.update(tally.bytes_read / 1e6, tokens_summary(writers))
        if not val_inputs:
            move_last_document_to_empty_split(held, writers)
        for split, document in held.items():
            writers[split].write_document(*document)
        progress.finish(tally.bytes_read / 1e6, tokens_summary(writers))
        splits = {split: writer.close() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    check_splits(splits, tally, settings["val_input"])
    return splits, tally


def move_last_document_to_empty_split(held, writers):
    for empty, full in (("val", "train"), ("train", "val")):
        if empty not in held and full in held and writers[full].documents > 0:
            held[empty] = held.pop(full)


def check_splits(splits, tally, val_input):
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(tally.dropped.items()))
    if documents == 0:
        raise PrepareError(f"no documents found: read {tally.documents_read} documents"
                           + (f", dropped {dropped}" if dropped else ""))
    if splits["val"]["documents"] == 0 and val_input:
        raise PrepareError(f"--val_input={val_input} gave no documents (after filtering)")
    for split, summary in splits.items():
        if summary["documents"] == 0:
            raise PrepareError(f"the {split} split is empty: {documents} document(s) kept, but train "
                               f"and val need at least one each; add text or use --val_input")


def tokens_summary(writers):
    return ", ".join(f"{writer.documents:,} {split} docs {writer.tokens / 1e6:,.2f}M tokens"
                     for split, writer in writers.items())


# ----------------------------------------------------------------------------------------
# Manifest and report

def manifest(settings, tokenizer_info, splits, tally, sources, timings):
    tokens = sum(split["tokens"] - split["documents"] for split in splits.values())  # no eot
    text_bytes = sum(split["bytes"] for split in splits.values())
    return {
        "format_version": META_FORMAT_VERSION,
        "tokenizer": tokenizer_info,
        "dtype": "uint16" if tokenizer_info["vocab_size"] <= 2 ** 16 else "uint32",
        "splits": splits,
        "bytes_per_token": round(text_bytes / max(tokens, 1), 4),  # text bytes per text token
        "sources": sources,
        "settings": settings,
        "filters": [check.__name__ for check in DOCUMENT_FILTERS] + ["exact_duplicates"],
        "documents": {"read": tally.documents_read, "bytes_read": tally.bytes_read,
                      "kept": sum(split["documents"] for split in splits.values()),
                      "invalid_utf8": tally.invalid_utf8},
        "dropped": dict(sorted(tally.dropped.items())),
        "timings_s": {stage: round(seconds, 3) for stage, seconds in timings.items()},
    }


def report_markdown(meta, name):
    documents, tokenizer = meta["documents"], meta["tokenizer"]
    lines = [f"# Dataset {name}", "", "## Sources", ""]
    lines += [f"- {json.dumps(source)}" for source in meta["sources"]]
    lines += ["", "## Documents", "", "| | documents |", "|---|---:|",
              f"| read | {documents['read']:,} ({documents['bytes_read'] / 1e6:,.2f} MB) |",
              f"| kept | {documents['kept']:,} |"]
    lines += [f"| dropped: {reason} | {count:,} |" for reason, count in meta["dropped"].items()]
    lines += ["", f"Filters, in order: {', '.join(meta['filters'])}.",
              f"Documents with bytes that were not UTF-8 (decoded with U+FFFD): {documents['invalid_utf8']:,}.",
              "", "## Tokenizer", "",
              f"{tokenizer['kind']}, {tokenizer['vocab_size']:,} tokens, end-of-text id "
              f"{tokenizer['eot_id']}, {meta['dtype']} shards, {meta['bytes_per_token']} bytes per token.",
              "", "## Splits", "", "| split | documents | tokens | MB | shards |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {split} | {summary['documents']:,} | {summary['tokens']:,} | "
              f"{summary['bytes'] / 1e6:,.2f} | {len(summary['shards'])} |"
              for split, summary in meta["splits"].items()]
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:,.2f} |" for stage, seconds in meta["timings_s"].items()]
    megabytes_per_s = documents["bytes_read"] / 1e6 / max(meta["timings_s"]["shards"], 1e-6)
    lines += ["", f"Filtering and tokenizing ran at {megabytes_per_s:,.1f} MB/s with "
                  f"{meta['settings']['num_workers']} worker(s)."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# Progress on stderr

class Progress:
    """A status line on stderr for a long stage: redrawn in place on a terminal, a new line
    every 10 s otherwise (logs), and a last line when the stage ends."""

    def __init__(self, stage, unit, total=None):
        self.stage, self.unit, self.total = stage, unit, total
        self.start = self.shown = time.monotonic()
        self.terminal = sys.stderr.isatty()

    def update(self, done, details="", final=False):
        now = time.monotonic()
        if not final and now - self.shown < (0.5 if self.terminal else 10):
            return
        self.shown = now
        rate = done / max(now - self.start, 1e-6)
        line = f"{self.stage}: {amount(done)}" + (f"/{amount(self.total)}" if self.total else "")
        line += f" {self.unit} in {now - self.start:,.1f} s ({amount(rate)} {self.unit}/s"
        if self.total and not final and rate > 0:
            line += f", ETA {max(self.total - done, 0) / rate:,.0f} s"
        line += ")" + (f" {details}" if details else "")
        print(("\r\033[K" if self.terminal else "") + line, end="\n" if final or not self.terminal else "",
              file=sys.stderr, flush=True)

    def finish(self, done, details=""):
        self.update(done, details, final=True)


def amount(number):
    return f"{number:,.0f}" if number >= 100 or float(number).is_integer() else f"{number:,.2f}"


# ----------------------------------------------------------------------------------------
# Command line and the whole run

def usage():
    lines = ["usage: python prepare.py [--key=value ...]", "", __doc__.strip().splitlines()[0], ""]
    for name, (default, help_text) in FLAGS.items():
        lines += [f"  --{name}={default}", f"      {help_text}"]
    return "\n".join(lines)


def parse_flags(argv):
    """Settings from --key=value flags, each checked against its default's type."""
    settings = {name: default for name, (default, _) in FLAGS.items()}
    for argument in argv:
        if argument in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        key, equals, value = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise PrepareError(f"expected --key=value, got {argument!r} (see --help)")
        if key not in FLAGS:
            closest = difflib.get_close_matches(key, FLAGS, n=1)
            hint = f"; did you mean --{closest[0]}?" if closest else ""
            raise PrepareError(f"unknown flag --{key}{hint} (see --help for all flags)")
        settings[key] = parse_value(key, value, type(FLAGS[key][0]))
    check_settings(settings)
    return settings


def parse_value(key, value, kind):
    try:
        if kind is int:
            number = float(value)  # accepts 1e6 and 1_000_000
            if not number.is_integer():
                raise ValueError
            return int(number)
        return kind(value)
    except ValueError:
        raise PrepareError(f"--{key}={value}: expected {'an integer' if kind is int else 'a number'}") from None


def check_settings(settings):
    def require(condition, message):
        if not condition:
            raise PrepareError(message)
    require(settings["source"] in SOURCES, f"--source={settings['source']}: expected one of {', '.join(SOURCES)}")
    require(settings["tokenizer"] in TOKENIZERS,
            f"--tokenizer={settings['tokenizer']}: expected one of {', '.join(TOKENIZERS)}")
    require(settings["vocab_size"] >= 257 or settings["tokenizer"] != "bpe",
            f"--vocab_size={settings['vocab_size']}: a BPE vocabulary needs at least 257 tokens "
            f"(256 bytes and end-of-text)")
    require(settings["vocab_size"] <= 2 ** 32, f"--vocab_size={settings['vocab_size']}: at most 2**32")
    require(0 < settings["val_fraction"] < 1 or settings["val_input"],
            f"--val_fraction={settings['val_fraction']}: expected a fraction between 0 and 1")
    require(1 <= settings["shard_tokens"] < 2 ** 31,
            f"--shard_tokens={settings['shard_tokens']}: expected 1 to 2**31-1 (the header's int32)")
    require(settings["tokenizer_train_chars"] >= 1, "--tokenizer_train_chars: expected at least 1")
    require(settings["num_workers"] >= 1, f"--num_workers={settings['num_workers']}: expected at least 1")
    for flag, source in (("input", "files"), ("url", "url")):
        require(bool(settings[flag]) == (settings["source"] == source),
                f"--{flag} is used with --source={source}, and --source={source} needs it")
    require(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", settings["name"] or settings["source"]),
            f"--name={settings['name']}: use letters, digits, '.', '_' and '-' (or --out_dir)")


def dataset_folder(settings):
    return Path(settings["out_dir"] or Path("data") / (settings["name"] or settings["source"])).resolve()


def start_build(final):
    """A hidden sibling of the final folder to build in. Downloads left by an earlier
    failed run stay (they are resumed); anything else there is cleared."""
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not (final / "meta.json").exists())):
        raise PrepareError(f"{final} exists and is not a dataset folder (no meta.json): "
                           f"refusing to replace it; choose another --name or --out_dir")
    build = final.parent / f".{final.name}.partial"
    build.mkdir(parents=True, exist_ok=True)
    clear_build(build)
    return build


def clear_build(build):
    for entry in build.iterdir():
        if entry.name != "downloads":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def discard_build(build):
    """Removes a failed build, but keeps downloads for the next run to reuse or resume."""
    clear_build(build)
    downloads = build / "downloads"
    if downloads.exists() and not any(downloads.iterdir()):
        downloads.rmdir()
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


def resolve_inputs(settings, build, final):
    """The source's input files, the --val_input files, and meta.json's sources list."""
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
    return inputs, val_inputs, sources


def build_dataset(settings, build, final):
    """Every stage in order; writes the dataset into build and returns its meta.json."""
    timings, start = {}, time.perf_counter()
    inputs, val_inputs, sources = resolve_inputs(settings, build, final)
    timings["inputs"] = time.perf_counter() - start
    files = inputs + val_inputs
    compressed = any(input_file.path.name.endswith(".gz") for input_file in files)
    total_mb = None if compressed else sum(input_file.path.stat().st_size for input_file in files) / 1e6
    stage_start = time.perf_counter()
    tokenizer_info = build_tokenizer(settings, inputs, val_inputs, build, total_mb, timings)
    timings["tokenizer"] = time.perf_counter() - stage_start
    stage_start = time.perf_counter()
    splits, tally = write_shards(settings, inputs, val_inputs, build, tokenizer_info, total_mb)
    timings["shards"] = time.perf_counter() - stage_start
    timings["total"] = time.perf_counter() - start
    meta = manifest(settings, tokenizer_info, splits, tally, sources, timings)
    atomic_write(build / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    atomic_write(build / "report.md", lambda f: f.write(report_markdown(meta, final.name).encode()))
    return meta


def main(argv):
    settings = parse_flags(argv)
    final = dataset_folder(settings)
    build = start_build(final)
    try:
        meta = build_dataset(settings, build, final)
    except BaseException:
        discard_build(build)
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
    except (PrepareError, OSError) as error:
        print(f"prepare.py: error: {error}", file=sys.stderr)
        sys.exit(1)
