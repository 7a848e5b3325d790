"""Tokenizers: train your own byte-level BPE, save it in tiktoken's file format, load any tokenizer.

    chunk_counts = count_chunks(texts)                # text cut into word-like chunks, counted
    vocabulary = train_bpe(chunk_counts, 8192)        # token byte strings in rank order
    sha256 = write_tiktoken_file(path, vocabulary)    # `base64(token) rank` per line
    encoder = load_tokenizer(folder, meta["tokenizer"])  # a tiktoken.Encoding
    encoder.encode("def f(x):", disallowed_special=())

Three kinds, all encoding through tiktoken: bpe (trained here on the corpus, pure Python),
byte (256 bytes and end-of-text; no training) and gpt2 (tiktoken's own; needs the network
once). End-of-text is the last id of every vocabulary we train.
"""
import base64
import hashlib
import heapq
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from functools import cache
from pathlib import Path

import tiktoken

from owngpt.dataset import EOT, atomic_write, read_meta
from owngpt.flags import UserError

TOKENIZERS = ("bpe", "byte", "gpt2")
# A chat's roles and the end of a turn (owngpt/chat.py), reserved after end-of-text in every BPE
# prepare.py writes and added to any tokenizer a chat dataset uses: ids that text never encodes to.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class TokenizerError(UserError):
    """A tokenizer that cannot be trained or loaded as described."""


# prepare.py without --vocab_size: a vocabulary in proportion to the train text, one token per
# BYTES_PER_VOCAB_ENTRY bytes rounded down to a power of two, from 512 up to the default. A small
# text spread over a large vocabulary leaves each token too few occurrences to learn from: 0.42 MB
# at 6,862 tokens (the most it supports) trains worse in the same time than at 1,024 (RESULTS.md:
# A vocabulary for a small text).
BYTES_PER_VOCAB_ENTRY = 400
SMALLEST_VOCAB = 512


def vocab_size_for(train_bytes, largest):
    """The vocabulary size for train_bytes of text when the user names none (at most largest)."""
    size = SMALLEST_VOCAB
    while size * 2 <= min(largest, train_bytes / BYTES_PER_VOCAB_ENTRY):
        size *= 2
    return min(size, largest)


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
    # at a time; the lookahead keeps the common BMP characters out of that scan (RESULTS.md:
    # the tokenizer's character classes)
    return f"(?:{brackets(bmp)}|(?=[\U00010000-\U0010FFFF]){brackets(astral)})"


def count_chunks(texts):
    """How often each chunk (see SPLIT_PATTERN) occurs in texts."""
    split = python_split_regex()
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    return chunk_counts


def train_bpe(chunk_counts, vocab_size, progress=None, shrink=False):
    """Byte-level BPE: the vocabulary (token bytes in rank order) of vocab_size - 1 tokens;
    the end-of-text token comes last. Each step merges the most frequent adjacent pair of
    tokens (ties: the smallest pair of ids), counted inside chunks and weighted by how
    often each chunk occurs; a pair must occur at least twice. A text with fewer such pairs
    is an error, or with shrink=True gets the largest vocabulary it supports."""
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
    if len(vocabulary) < target and not shrink:
        raise TokenizerError(
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


# ----------------------------------------------------------------------------- files and loading
def load_tokenizer(folder, tokenizer_info=None):
    """The tiktoken.Encoding described by tokenizer_info (meta.json's "tokenizer" entry,
    read from folder/meta.json when None); a trained BPE's file is read from folder."""
    info = tokenizer_info if tokenizer_info is not None else read_meta(folder)["tokenizer"]
    kind, chat_tokens = info["kind"], info.get("chat_tokens", {})
    if kind == "bpe":
        encoder = _encoding("owngpt-bpe", read_tiktoken_file(Path(folder) / info["file"], info["sha256"]), chat_tokens)
    elif kind == "byte":
        encoder = _encoding("owngpt-byte", [bytes([value]) for value in range(256)], chat_tokens)
    elif kind == "gpt2":
        encoder = gpt2_encoding(chat_tokens)
    else:
        raise TokenizerError(f"{folder}: unknown tokenizer kind {kind!r}, expected one of {TOKENIZERS}")
    if (encoder.n_vocab, encoder.eot_token) != (info["vocab_size"], info["eot_id"]):
        raise TokenizerError(f"{folder}: the {kind} tokenizer has {encoder.n_vocab} tokens and end-of-text "
                         f"id {encoder.eot_token}, but its description says {info['vocab_size']} "
                         f"and {info['eot_id']}")
    return encoder


def reused_tokenizer(path):
    """meta.json's tokenizer entry for --tokenizer=PATH: a dataset folder (its meta.json
    says which tokenizer), or an out folder or file holding a tokenizer.tiktoken."""
    path = Path(path)
    if (path / "meta.json").is_file():
        info = read_meta(path)["tokenizer"]
        file = path / info["file"] if info.get("file") else None
    else:
        file = path / "tokenizer.tiktoken" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"--tokenizer={path}: expected bpe, byte, gpt2, a dataset folder (with "
                                 f"meta.json), or an out folder or file with a tokenizer.tiktoken")
        sha256 = hashlib.sha256(file.read_bytes()).hexdigest()
        size = len(read_tiktoken_file(file, sha256))  # checks every line
        info = with_chat_tokens({"kind": "bpe", "vocab_size": size + 1, "eot_id": size, "file": "tokenizer.tiktoken",
                                 "sha256": sha256})
    load_tokenizer(file.parent if file else path, {**info, "file": file.name if file else None})
    return info, file


def with_chat_tokens(tokenizer_info):
    """meta.json's tokenizer entry with the chat tokens after its last id (as it is when it has
    them): the ids of its tokens, end-of-text's among them, stay as they are."""
    if "chat_tokens" in tokenizer_info:
        return tokenizer_info
    first = tokenizer_info["vocab_size"]
    return {**tokenizer_info, "vocab_size": first + len(CHAT_TOKENS),
            "chat_tokens": {token: first + index for index, token in enumerate(CHAT_TOKENS)}}


def _encoding(name, vocabulary, chat_tokens=None):
    """tiktoken encoding: the tokens in rank order, then the end-of-text special token, then
    the chat tokens when given ({token: id}: owngpt/chat.py)."""
    chat_tokens = chat_tokens or {}
    return tiktoken.Encoding(
        f"{name}-{len(vocabulary) + 1 + len(chat_tokens)}", pat_str=SPLIT_PATTERN,
        mergeable_ranks={token: rank for rank, token in enumerate(vocabulary)},
        special_tokens={EOT: len(vocabulary), **chat_tokens})


def gpt2_encoding(chat_tokens=None):
    """tiktoken's GPT-2 encoding, with the chat tokens ({token: id}) when given."""
    try:
        encoding = tiktoken.get_encoding("gpt2")
    except OSError as error:  # requests' errors are OSErrors
        raise TokenizerError(
            f"the gpt2 tokenizer needs the network the first time (tiktoken downloads its files "
            f"and caches them), and the download failed: {error}. Offline, use --tokenizer=bpe "
            f"or --tokenizer=byte.") from None
    if not chat_tokens:
        return encoding
    return tiktoken.Encoding(f"gpt2-chat-{encoding.n_vocab + len(chat_tokens)}", pat_str=encoding._pat_str,
                             mergeable_ranks=encoding._mergeable_ranks,
                             special_tokens={**encoding._special_tokens, **chat_tokens})


def read_tiktoken_file(path, sha256):
    """The token byte strings of a tokenizer.tiktoken file (`base64(token) rank` per line),
    checked against the sha256 recorded when it was written."""
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise TokenizerError(f"{path}: sha256 is {actual} but the dataset recorded {sha256}: the "
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
            raise TokenizerError(f"{path}:{number}: expected 'base64-token {number - 1}', found {line[:60]!r}")
    return vocabulary


def write_tiktoken_file(path, vocabulary):
    """Writes tiktoken's own format, so tiktoken.load.load_tiktoken_bpe reads it too."""
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(vocabulary))
    atomic_write(path, lambda f: f.write(lines))
    return hashlib.sha256(lines).hexdigest()


def token_byte_lengths(encoding):
    """Bytes of text each token id stands for (end-of-text and the chat tokens count 0: they
    are boundaries, not text), so losses can be turned into bits per byte, which compares
    across tokenizers."""
    special = {encoding.encode_single_token(token) for token in encoding.special_tokens_set}
    return [0 if token in special else len(encoding.decode_single_token_bytes(token))
            for token in range(encoding.n_vocab)]
