"""prepare.py and owngpt/sources.py: the BPE trainer, the tokenizer file, shards, sources and
the command line.

Everything runs offline on small data made here; the command line runs as a real
subprocess and URLs are served by a real http.server on 127.0.0.1.
"""
import hashlib
import http.server
import json
import os
import socket
import random
import threading
from collections import Counter

import numpy as np
import pytest
import tiktoken.load

from helpers import (BYTE_TOKENIZER, bin_files, conversion, documents_in, gzip_members, kept_documents, make_text,
                     run_prepare, send_body, warc_record, warcinfo)
from owngpt import dataset, filtered, sources, tokenizer
from owngpt.flags import UserError
from owngpt.web import crawl, filters
import prepare

# Text that a tokenizer must round-trip exactly: emoji (with skin tones and zero-width
# joiners), flags, CJK, Hangul, Arabic, combining marks, control characters.
UNICODE_SAMPLES = [
    "naïve café — “quotes” and ‘apostrophes’ don't WON'T it's",
    "emoji 🤖🚀 family 👩‍👩‍👧‍👦 skin 👍🏽 flag 🇫🇷🇯🇵 keycap 1️⃣",
    "日本語のテキストと中文文本，한국어 텍스트",
    "مرحبا بالعالم ׁ שלום",
    "e\u0301 a\u0308 Z̷͓̈́a̵̡l̴g̶o̷ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "tabs\tand\r\nwindows lines\x00nul\x1c\x85\u2028 \u3000 trailing   ",
    "<|endoftext|> is plain text inside a document",
]


def write_files(folder, texts, suffix=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (folder / f"doc_{index:03d}{suffix}").write_text(text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------
# Split pattern and BPE trainer

def test_split_pattern_cuts_words_numbers_punctuation_and_spaces():
    chunks = tokenizer.python_split_regex().findall("Hello  world's 12345 (x+y)!\n\n  z")
    assert chunks == ["Hello", " ", " world", "'s", " ", "123", "45", " (", "x", "+y", ")!\n\n",
                      " ", " z"]


def test_python_split_agrees_with_tiktokens_split():
    # An encoding whose vocabulary holds every chunk of the Python split encodes each of
    # tiktoken's pieces as one token exactly when tiktoken cut the text the same way.
    text = "\n".join(UNICODE_SAMPLES) + "\n" + make_text(0)
    chunks = [chunk.encode() for chunk in tokenizer.python_split_regex().findall(text)]
    vocabulary = [bytes([value]) for value in range(256)]
    vocabulary += sorted({chunk for chunk in chunks if len(chunk) > 1})
    encoder = tokenizer._encoding("split-check", vocabulary)
    pieces = [encoder.decode_single_token_bytes(token) for token in encoder.encode_ordinary(text)]
    assert pieces == chunks


def naive_bpe(chunk_counts, vocab_size):
    """Textbook BPE: recount every pair after every merge, merge the most frequent pair
    (ties: the smallest pair of ids), stop when no pair occurs twice."""
    vocabulary = [bytes([value]) for value in range(256)]
    words = [(list(chunk.encode()), count) for chunk, count in chunk_counts.items()]
    while len(vocabulary) < vocab_size - 1:
        pairs = Counter()
        for word, count in words:
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs or max(pairs.values()) < 2:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged_bytes = vocabulary[best[0]] + vocabulary[best[1]]
        if merged_bytes not in vocabulary:
            vocabulary.append(merged_bytes)
        new_id = vocabulary.index(merged_bytes)
        rewritten = []
        for word, count in words:
            out, index = [], 0
            while index < len(word):
                if tuple(word[index:index + 2]) == best:
                    out.append(new_id)
                    index += 2
                else:
                    out.append(word[index])
                    index += 1
            rewritten.append((out, count))
        words = rewritten
    return vocabulary


def test_bpe_merges_equal_a_naive_reference_merge_for_merge():
    texts = [make_text(seed, sentences=20) for seed in range(3)] + UNICODE_SAMPLES + ["aaaaaaa bbbb aaa"]
    chunk_counts = tokenizer.count_chunks(texts)
    vocabulary = tokenizer.train_bpe(chunk_counts, vocab_size=420)
    assert len(vocabulary) == 419
    assert vocabulary == naive_bpe(chunk_counts, vocab_size=420)


def test_bpe_merges_only_pairs_that_occur_twice_and_refuses_a_vocabulary_larger_than_they_make():
    chunk_counts = tokenizer.count_chunks(["the cat sat on the mat, the cat sat."])
    # "at" occurs 5 times, "he" and "the" 3, " c", " s", " the", " cat" and " sat" twice; " on" and " mat" once
    merges = [b"at", b"he", b"the", b" c", b" s", b" the", b" cat", b" sat"]
    assert tokenizer.train_bpe(chunk_counts, vocab_size=400, shrink=True)[256:] == merges
    with pytest.raises(tokenizer.TokenizerError, match=r"--vocab_size=400 is more than this text supports: after 8 "
                                                       r"merges no pair of tokens occurs twice\. Use at most --vocab_size=265,"):
        tokenizer.train_bpe(chunk_counts, vocab_size=400)


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory):
    """A 600-token BPE trained on generated text and the Unicode samples, saved as a
    dataset folder's tokenizer; returns (folder, tokenizer_info)."""
    folder = tmp_path_factory.mktemp("bpe")
    texts = [make_text(seed) for seed in range(6)] + UNICODE_SAMPLES
    vocabulary = tokenizer.train_bpe(tokenizer.count_chunks(texts), vocab_size=600)
    sha256 = tokenizer.write_tiktoken_file(folder / "tokenizer.tiktoken", vocabulary)
    info = {"kind": "bpe", "vocab_size": 600, "eot_id": 599, "file": "tokenizer.tiktoken", "sha256": sha256}
    return folder, info


def test_bpe_round_trip_is_exact_on_arbitrary_unicode(trained_bpe):
    encoder = tokenizer.load_tokenizer(*trained_bpe)
    rng = random.Random(0)
    random_texts = ["".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd800),
                                            rng.randrange(0xe000, 0x110000)])) for _ in range(200))
                    for _ in range(20)]
    for text in UNICODE_SAMPLES + random_texts:
        tokens = encoder.encode_ordinary(text)
        assert encoder.decode(tokens) == text
        assert max(tokens) < encoder.eot_token
    assert len(encoder.encode_ordinary(make_text(0))) < len(make_text(0).encode()) / 2  # it compresses


def test_bpe_tokenizer_has_end_of_text_as_its_last_id(trained_bpe):
    encoder = tokenizer.load_tokenizer(*trained_bpe)
    assert (encoder.n_vocab, encoder.eot_token) == (600, 599)
    assert encoder.encode(dataset.EOT, allowed_special="all") == [599]
    assert 599 not in encoder.encode_ordinary(dataset.EOT)


def test_a_documents_tokens_stand_for_its_bytes_and_end_of_text_for_none(trained_bpe):
    # bits per byte divide by these lengths: end-of-text is a boundary between documents, not text
    encoder = tokenizer.load_tokenizer(*trained_bpe)
    lengths = tokenizer.token_byte_lengths(encoder)
    assert len(lengths) == 600 and lengths[599] == 0 and lengths[:256] == [1] * 256
    for text in UNICODE_SAMPLES:  # each document as the shards hold it: end-of-text, then its tokens
        tokens = [encoder.eot_token, *encoder.encode_ordinary(text)]
        assert sum(lengths[token] for token in tokens) == len(text.encode("utf-8"))


def test_tokenizer_file_is_read_by_tiktokens_own_loader(trained_bpe, monkeypatch):
    folder, _ = trained_bpe
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the file itself, no cache copy
    ranks = tiktoken.load.load_tiktoken_bpe(str(folder / "tokenizer.tiktoken"))
    vocabulary = tokenizer.read_tiktoken_file(folder / "tokenizer.tiktoken", trained_bpe[1]["sha256"])
    assert ranks == {token: rank for rank, token in enumerate(vocabulary)}
    assert len(ranks) == 599


def test_load_tokenizer_rejects_a_changed_tokenizer_file(trained_bpe, tmp_path):
    folder, info = trained_bpe
    lines = (folder / "tokenizer.tiktoken").read_bytes().splitlines(keepends=True)
    (tmp_path / "tokenizer.tiktoken").write_bytes(b"".join(lines[:-1]))
    with pytest.raises(tokenizer.TokenizerError, match="tokenizer.tiktoken: sha256 is .* but the dataset recorded"):
        tokenizer.load_tokenizer(tmp_path, info)


def test_byte_tokenizer_is_256_bytes_and_end_of_text(tmp_path):
    encoder = tokenizer.load_tokenizer(tmp_path, BYTE_TOKENIZER)
    assert encoder.encode_ordinary("hé") == [104, 0xC3, 0xA9]
    assert encoder.eot_token == 256


# ---------------------------------------------------------------------------------------
# Shard format

def test_shard_writer_fills_shards_of_shard_tokens_and_writes_the_llm_c_header(tmp_path):
    writer = dataset.ShardWriter(tmp_path, "train", vocab_size=257, shard_tokens=10)
    writer.write_document(np.arange(7), text_bytes=6)
    writer.write_document(np.arange(18), text_bytes=17)
    summary = writer.close()
    assert summary == {"shards": ["train_000000.bin", "train_000001.bin", "train_000002.bin"],
                       "tokens": 25, "documents": 2, "bytes": 23}
    header = np.fromfile(tmp_path / "train_000002.bin", dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert (tmp_path / "train_000002.bin").stat().st_size == 1024 + 5 * 2
    tokens = np.concatenate([dataset.read_shard(tmp_path / name) for name in summary["shards"]])
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == list(range(7)) + list(range(18))


@pytest.mark.parametrize("vocab_size, magic, version, dtype", [
    (65536, 20240520, 1, np.uint16), (65537, 20240801, 7, np.uint32), (200_000, 20240801, 7, np.uint32)])
def test_shards_use_uint32_only_above_65536_tokens(tmp_path, vocab_size, magic, version, dtype):
    writer = dataset.ShardWriter(tmp_path, "val", vocab_size=vocab_size, shard_tokens=100)
    writer.write_document(np.array([vocab_size - 1, 0, 65535]), text_bytes=3)
    writer.close()
    assert list(np.fromfile(tmp_path / "val_000000.bin", dtype="<i4", count=3)) == [magic, version, 3]
    tokens = dataset.read_shard(tmp_path / "val_000000.bin")
    assert tokens.dtype == dtype and tokens.tolist() == [vocab_size - 1, 0, 65535]


@pytest.fixture
def good_shard(tmp_path):
    writer = dataset.ShardWriter(tmp_path, "train", vocab_size=257, shard_tokens=100)
    writer.write_document(np.arange(40), text_bytes=39)
    writer.close()
    return tmp_path / "train_000000.bin"


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-2], r"the header says 40 tokens, so 1104 bytes, but the file has 1102 bytes"),
    (lambda data: data[:1000], r"1000 bytes is too short for the 1024-byte shard header"),
    (lambda data: (12345).to_bytes(4, "little") + data[4:], r"bad magic number 12345"),
    (lambda data: data[:4] + (7).to_bytes(4, "little") + data[8:], r"magic 20240520 needs version 1, found 7"),
])
def test_read_shard_rejects_a_damaged_file_naming_it(good_shard, damage, message):
    good_shard.write_bytes(damage(good_shard.read_bytes()))
    with pytest.raises(dataset.ShardError, match=message) as error:
        dataset.read_shard(good_shard)
    assert str(good_shard) in str(error.value)
    assert isinstance(error.value, dataset.DatasetError)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "meta.json"
    dataset.atomic_write(target, lambda f: f.write(b"old"))

    def fail_midway(f):
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        dataset.atomic_write(target, fail_midway)
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["meta.json"]


# ---------------------------------------------------------------------------------------
# Sources

PAGES = [("https://example.org/a", "eng", "First page.\nWith two lines."),
         ("https://example.org/b", "fra", "Deuxième page, café crème."),
         ("https://example.org/c", "jpn,eng", "三番目のページ 🙂")]


def test_wet_gz_with_one_gzip_member_per_record_parses_into_documents(tmp_path):
    records = [warcinfo(), *(conversion(number, *page) for number, page in enumerate(PAGES, start=1))]
    (tmp_path / "crawl.warc.wet.gz").write_bytes(gzip_members(records))
    (input_file,), _ = sources.file_inputs(str(tmp_path / "crawl.warc.wet.gz"))
    documents = list(sources.read_documents(input_file, "text"))
    assert [document.text for document in documents] == [text for _, _, text in PAGES]
    assert [(document.metadata["WARC-Target-URI"], document.metadata["WARC-Identified-Content-Language"])
            for document in documents] == [(url, language) for url, language, _ in PAGES]
    assert documents[1].metadata["WARC-Date"] == "2025-06-03T12:00:00Z"
    assert len({document.id for document in documents}) == 3


def test_warc_parser_reads_records_split_across_blocks_and_counts_a_cut_record():
    data = warc_record({"WARC-Type": "conversion", "Content-Length": 6}, "héllo".encode())
    blocks = [data[index:index + 3] for index in range(0, len(data), 3)]  # any split of the bytes
    assert list(crawl.warc_records(blocks, gzipped=False)) == [
        ({"WARC-Type": "conversion", "Content-Length": "6"}, "héllo".encode())]
    assert list(crawl.warc_records([data + data[:-7]], gzipped=False)) == [
        ({"WARC-Type": "conversion", "Content-Length": "6"}, "héllo".encode()), crawl.Dropped("bad_record:truncated")]


def test_jsonl_gives_one_document_per_line_from_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two ✓"}\n', encoding="utf-8")
    (input_file,), _ = sources.file_inputs(str(path))
    documents = list(sources.read_documents(input_file, "text"))
    assert [(document.id, document.text) for document in documents] == [
        (f"{path.as_posix()}:1", "one"), (f"{path.as_posix()}:3", "two ✓")]
    with pytest.raises(sources.SourceError, match=r"docs.jsonl:1: expected a JSON object with a string field 'body'"):
        list(sources.read_documents(input_file, "body"))


def test_python_source_is_the_stdlib_without_test_suites():
    inputs, source = sources.python_inputs()
    names = [input_file.name for input_file in inputs]
    assert "json/decoder.py" in names and "os.py" in names
    assert names[-1] == "pydoc_data/topics" and inputs[-1].kind == "pydoc_topics"
    assert not [name for name in names if {"test", "tests", "idlelib", "site-packages", "__pycache__"}
                & set(name.split("/"))]
    topics = list(sources.read_documents(inputs[-1], "text"))
    assert len(topics) > 50 and topics[0].id.startswith("pydoc_data/topics:")
    assert source["files"] == len(inputs)


def test_download_names_stay_inside_the_downloads_folder():
    for url in ["http://h/../../etc/passwd", "https://h/a/..%2F..%2Fx", "http://h/", "http://h/.hidden",
                "http://h/" + "x" * 500]:
        name = crawl.download_name(url)
        assert "/" not in name and "\\" not in name and not name.startswith(".") and len(name) < 100
    assert crawl.download_name("http://h/a.txt") != crawl.download_name("http://g/a.txt")
    for bad in ["ftp://h/x.txt", "file:///etc/passwd", "/etc/passwd", "http:///x"]:
        with pytest.raises(crawl.WebTextError, match="is not an http"):
            crawl.download_name(bad)


# ---------------------------------------------------------------------------------------
# The command line: a whole dataset

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Generated .txt/.md files (one empty, one a duplicate, one the same text in capitals,
    which is no duplicate outside web text, one holding the end-of-text string) and a .jsonl of
    400 short documents, so tokenizing takes several batches."""
    folder = write_files(tmp_path_factory.mktemp("corpus") / "text", [make_text(seed) for seed in range(8)])
    (folder / "notes.md").write_text("# Notes\n\n" + "\n".join(UNICODE_SAMPLES), encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "copy.txt").write_text(make_text(3), encoding="utf-8")
    (folder / "shouted.txt").write_text(make_text(3).upper(), encoding="utf-8")
    (folder / "skipped.csv").write_text("a,b\n", encoding="utf-8")
    lines = [json.dumps({"text": make_text(1000 + index, sentences=2)}) for index in range(400)]
    (folder / "many.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def expected_documents(corpus):
    texts = [path.read_bytes().decode() for path in sorted(corpus.glob("*.txt"))
             if path.name not in ("empty.txt", "copy.txt")]
    texts.append((corpus / "notes.md").read_bytes().decode())  # keeps its \r\n
    texts += [json.loads(line)["text"] for line in (corpus / "many.jsonl").read_text().splitlines()]
    return texts


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """The corpus prepared with one worker; returns (folder, completed process)."""
    folder = tmp_path_factory.mktemp("built") / "dataset"
    # a relative --input: the document ids, and so the val split, are the same in every session
    result = run_prepare("--source=files", f"--input={corpus.name}", f"--out_dir={folder}", "--vocab_size=400",
                         "--shard_tokens=3000", "--val_fraction=0.1", "--num_workers=1", cwd=corpus.parent)
    return folder, result


def test_every_document_is_in_exactly_one_split_starting_with_end_of_text(built, corpus):
    folder, _ = built
    train, val = documents_in(folder, "train"), documents_in(folder, "val")
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.2  # --val_fraction=0.1 of ~410
    assert Counter(train + val) == Counter(expected_documents(corpus))
    assert not set(train) & set(val)


def test_shards_follow_the_llm_c_format_and_agree_with_meta(built):
    folder, _ = built
    meta = dataset.read_meta(folder)
    assert meta["dtype"] == "uint16"
    for split, summary in meta["splits"].items():
        counts = []
        for name in summary["shards"]:
            magic, version, count = np.fromfile(folder / name, dtype="<i4", count=3)
            assert (magic, version) == (20240520, 1)
            assert (folder / name).stat().st_size == 1024 + 2 * count
            counts.append(int(count))
        assert all(count == 3000 for count in counts[:-1]) and 0 < counts[-1] <= 3000
        assert sum(counts) == summary["tokens"]
        assert summary["documents"] == len(documents_in(folder, split))


def test_meta_json_describes_the_tokenizer_drops_and_timings(built, corpus):
    folder, result = built
    meta = dataset.read_meta(folder)
    # 399 BPE tokens, end-of-text, and the chat tokens after it (owngpt/chat.py)
    assert meta["tokenizer"] == {"kind": "bpe", "vocab_size": 404, "eot_id": 399, "file": "tokenizer.tiktoken",
                                 "sha256": hashlib.sha256((folder / "tokenizer.tiktoken").read_bytes()).hexdigest(),
                                 "chat_tokens": {"<|system|>": 400, "<|user|>": 401, "<|assistant|>": 402, "<|end|>": 403}}
    assert meta["format_version"] == 1
    assert meta["dropped"] == {"duplicate": 1, "empty": 1}
    assert meta["documents"]["read"] == len(expected_documents(corpus)) + 2
    assert meta["sources"][0]["skipped_files"] == 1
    assert meta["settings"]["vocab_size"] == 400
    text_bytes = sum(len(text.encode()) for text in expected_documents(corpus))
    assert sum(split["bytes"] for split in meta["splits"].values()) == text_bytes
    encoder = tokenizer.load_tokenizer(folder)
    text_tokens = sum(len(encoder.encode_ordinary(text)) for text in expected_documents(corpus))
    assert meta["bytes_per_token"] == round(text_bytes / text_tokens, 4)  # of the text: end-of-text is none
    assert {"tokenizer", "shards", "total"} <= set(meta["timings_s"])
    report = (folder / "report.md").read_text()
    assert "| dropped: empty | 1 |" in report and "| dropped: duplicate | 1 |" in report
    assert "shards:" in result.stderr and "bpe:" in result.stderr  # the progress lines
    assert not list(folder.parent.glob(".*"))  # no build folder or temporary file left


def test_two_runs_give_identical_shards(built, corpus):
    folder, _ = built
    before = bin_files(folder)
    run_prepare("--source=files", f"--input={corpus.name}", f"--out_dir={folder}", "--vocab_size=400",
                "--shard_tokens=3000", "--val_fraction=0.1", "--num_workers=1", cwd=corpus.parent)
    assert bin_files(folder) == before


@pytest.mark.slow
def test_several_workers_give_the_same_shards_as_one(built, corpus, tmp_path):
    folder, _ = built
    run_prepare("--source=files", f"--input={corpus.name}", f"--out_dir={tmp_path / 'parallel'}", "--vocab_size=400",
                "--shard_tokens=3000", "--val_fraction=0.1", "--num_workers=2", cwd=corpus.parent)
    assert bin_files(tmp_path / "parallel") == bin_files(folder)


def test_a_tiny_corpus_gives_val_the_tail_of_each_document(tmp_path):
    write_files(tmp_path / "in", ["first document", "second document"])
    run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--val_fraction=0.01", "--name=tiny",
                cwd=tmp_path)
    folder = tmp_path / "data" / "tiny"
    meta = dataset.read_meta(folder)
    assert meta["split_rule"]["rule"] == "tails"
    train, val = documents_in(folder, "train"), documents_in(folder, "val")
    assert [head + tail for head, tail in zip(train, val)] == ["first document", "second document"]
    assert all(tail for tail in val)


def test_val_input_files_become_the_val_split(tmp_path):
    write_files(tmp_path / "train", ["alpha text", "beta text", "gamma text"])
    write_files(tmp_path / "val", ["held out text"], suffix=".md")
    run_prepare("--source=files", "--input=train", "--val_input=val/*.md", "--tokenizer=byte",
                "--out_dir=out", cwd=tmp_path)
    assert documents_in(tmp_path / "out", "val") == ["held out text"]
    assert sorted(documents_in(tmp_path / "out", "train")) == ["alpha text", "beta text", "gamma text"]


def test_a_file_that_is_not_utf8_is_decoded_with_replacement_and_counted(tmp_path):
    write_files(tmp_path / "in", ["plain text one", "plain text two"])
    (tmp_path / "in" / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--out_dir=out", cwd=tmp_path)
    meta = dataset.read_meta(tmp_path / "out")
    assert meta["documents"]["invalid_utf8"] == 1
    assert "caf\ufffd au lait" in kept_documents(tmp_path / "out")
    assert "decoded with U+FFFD): 1" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("flags, message", [
    (["--vocab=300"], "unknown flag --vocab; did you mean 'vocab_size'?"),
    (["--vocab_size=256"], "--vocab_size=256: a BPE vocabulary needs at least 257 tokens"),
    (["--vocab_size=lots"], "--vocab_size=lots: expected an integer"),
    (["--val_fraction=1.5"], "--val_fraction=1.5: expected a fraction between 0 and 1"),
    (["--source=web"], "--source=web: expected one of python, files, url"),
    (["--source=files"], "--input is used with --source=files or chat, and those need it"),
    (["--source=files", "--input=nowhere/"], "--input: no such file or folder: nowhere/"),
    (["--source=files", "--input=*.nothing"], "--input: '*.nothing' matches no files"),
    (["--source=files", "--input=data.csv"], "data.csv is not a supported file type"),
    (["vocab_size=300"], "expected --key=value, got 'vocab_size=300'"),
])
def test_bad_flags_and_inputs_fail_clearly(tmp_path, flags, message):
    (tmp_path / "data.csv").write_text("a,b\n")
    result = run_prepare(*flags, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


# A value out of range or not among the choices, for every flag of prepare.py.
BAD_VALUES = {
    "source": "web", "input": ",", "val_input": " , ", "url": "ftp://example.org/a.txt",
    "crawl": "CC MAIN 2025", "wet_files": "0", "max_docs": "-1", "cc_base_url": "data.commoncrawl.org",
    "cc_index_url": "file:///collinfo.json", "text_field": "", "filters": "some", "keep_metadata": "maybe",
    "tokenizer": "sentencepiece", "vocab_size": "0", "tokenizer_train_chars": "0",
    "shard_tokens": str(2 ** 31), "val_fraction": "1.5", "num_workers": "0", "name": "../elsewhere",
    "out_dir": "a_file.txt", "languages": "English", "task": "-2", "tasks": "-1", "merge": "maybe",
    "parts": "a_file.txt",
}
WEB_BAD_VALUES = {filters.FRACTION: "1.5", filters.COUNT: "-1", filters.POSITIVE: "0"}
WEB_DEFAULTS, _, WEB_CHECKS = filters.settings_flags()
BAD_VALUES |= {name: WEB_BAD_VALUES[WEB_CHECKS[name]] if name in WEB_CHECKS else "maybe"  # a switch
               for name in WEB_DEFAULTS if name not in BAD_VALUES}
RUN_AS_A_SCRIPT = ("source", "shard_tokens", "gopher_max_dup_5gram", "pii")  # the rest in this process


def test_every_flag_has_a_bad_value_to_try():
    assert set(BAD_VALUES) == set(prepare.DEFAULTS)


@pytest.mark.parametrize("flag", list(BAD_VALUES))
def test_every_flag_refuses_a_bad_value_in_one_line_naming_the_flag(flag, tmp_path, monkeypatch):
    (tmp_path / "a_file.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    argument = f"--{flag}={BAD_VALUES[flag]}"
    if flag in RUN_AS_A_SCRIPT:
        result = run_prepare(argument, cwd=tmp_path, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        message = result.stderr.removeprefix("prepare.py: error: ").rstrip("\n")
    else:
        with pytest.raises(UserError) as error:
            prepare.read_settings([argument])
        message = str(error.value)
    assert f"--{flag}=" in message and "\n" not in message
    assert not (tmp_path / "data").exists()


def test_help_lists_every_flag_with_its_default(tmp_path):
    result = run_prepare("--help", cwd=tmp_path)
    for name, (default, _) in prepare.FLAGS.items():
        assert f"--{name}={default}" in result.stdout


def test_no_documents_found_leaves_no_dataset_folder(tmp_path):
    write_files(tmp_path / "in", ["", "   \n\t"])
    result = run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--name=none", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert "no documents found: read 2 documents, dropped 2 empty" in result.stderr
    assert list((tmp_path / "data").iterdir()) == []


def test_one_text_file_is_cut_into_a_train_head_and_a_val_tail(tmp_path):
    text = "".join(make_text(seed) for seed in range(20))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    run_prepare("--source=files", "--input=book.txt", "--name=book", cwd=tmp_path)  # defaults otherwise
    folder = tmp_path / "data" / "book"
    meta = dataset.read_meta(folder)
    (head,), (tail,) = documents_in(folder, "train"), documents_in(folder, "val")
    assert head + tail == text and tail.startswith(text[len(head):])  # no text in both
    assert 0.04 < len(tail) / len(text) < 0.1  # about --val_fraction=0.05, cut at a line start
    assert head.endswith("\n")
    assert meta["split_rule"]["rule"] == "tails"
    report = (folder / "report.md").read_text()
    assert "Val is the last 5% of each document's text: the hash of the document ids put 0 of 1" in report
    # without --vocab_size, a text this small gets the smallest vocabulary of the rule, and the report says why
    assert meta["tokenizer"]["vocab_size"] == 516 and "512 tokens, not the default 8,192" in report  # and 4 chat tokens


def test_an_explicit_vocab_size_the_text_cannot_support_stays_an_error(tmp_path):
    (tmp_path / "book.txt").write_text(make_text(0), encoding="utf-8")
    result = run_prepare("--source=files", "--input=book.txt", "--vocab_size=8192", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--vocab_size=8192 is more than this text supports" in result.stderr.splitlines()[-1]


def test_whole_documents_go_to_val_when_the_hash_picks_enough_of_them(tmp_path):
    write_files(tmp_path / "in", [make_text(seed) for seed in range(40)])
    run_prepare("--source=files", "--input=in", "--val_fraction=0.2", "--tokenizer=byte", "--out_dir=out", cwd=tmp_path)
    meta = dataset.read_meta(tmp_path / "out")
    assert meta["split_rule"]["rule"] == "documents"
    train, val = documents_in(tmp_path / "out", "train"), documents_in(tmp_path / "out", "val")
    assert len(val) >= filtered.MIN_VAL_DOCUMENTS and not set(train) & set(val)
    assert sorted(train + val) == sorted(make_text(seed) for seed in range(40))


@pytest.mark.slow
def test_few_documents_give_the_same_shards_with_one_and_two_workers(tmp_path):
    write_files(tmp_path / "in", [make_text(seed, sentences=200) for seed in range(3)])
    for workers in (1, 2):
        run_prepare("--source=files", "--input=in", f"--num_workers={workers}", "--vocab_size=300",
                    f"--out_dir=out{workers}", cwd=tmp_path)
    assert dataset.read_meta(tmp_path / "out1")["split_rule"]["rule"] == "tails"
    assert bin_files(tmp_path / "out1") == bin_files(tmp_path / "out2")


@pytest.mark.slow
def test_a_failed_rerun_keeps_the_previous_dataset(tmp_path):
    write_files(tmp_path / "in", ["first document", "second document", "third document"])
    run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--out_dir=out", cwd=tmp_path)
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    (tmp_path / "in" / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    result = run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--out_dir=out", cwd=tmp_path,
                         check=False)
    assert "broken.jsonl:2: not valid JSON" in result.stderr
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in", "out"]


def test_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path):
    write_files(tmp_path / "in", ["first document", "second document"])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.txt").write_text("years of work")
    result = run_prepare("--source=files", "--input=in", "--tokenizer=byte", "--out_dir=precious", cwd=tmp_path,
                         check=False)
    assert "precious exists and is not a dataset folder" in result.stderr
    assert (tmp_path / "precious" / "thesis.txt").read_text() == "years of work"


def test_gpt2_without_network_says_so_plainly(tmp_path):
    write_files(tmp_path / "in", ["first document", "second document"])
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = run_prepare("--source=files", "--input=in", "--tokenizer=gpt2", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1
    assert "the gpt2 tokenizer needs the network the first time" in result.stderr


# ---------------------------------------------------------------------------------------
# The url source, against a real HTTP server

class TextServer(http.server.BaseHTTPRequestHandler):
    """Serves `files` (404 for other paths); `plans[path]` lists what the next requests get
    instead: an HTTP status, or "broken" (headers for the whole body, half of it, hang up)."""
    files, plans, log = {}, {}, []

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range")))
        plan = self.plans.get(self.path) or ["ok" if self.path in self.files else 404]
        behaviour = plan.pop(0)
        if isinstance(behaviour, int):
            self.send_error(behaviour)
            return
        body = self.files[self.path]
        send_body(self, body, broken=behaviour == "broken")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TextServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def serve(path, text, plan=()):
    TextServer.files[path] = text.encode()
    TextServer.plans[path] = list(plan)
    return path


def requests_for(path):
    return [entry for entry in TextServer.log if entry[0] == path]


@pytest.mark.slow
def test_url_source_downloads_once_and_a_rerun_downloads_nothing(server, tmp_path):
    paths = [serve(f"/book{index}.txt", make_text(index)) for index in range(3)]
    flags = ["--source=url", "--url=" + ",".join(server + path for path in paths), "--tokenizer=byte", "--name=books"]
    run_prepare(*flags, cwd=tmp_path)
    folder = tmp_path / "data" / "books"
    downloaded = sorted((folder / "downloads").iterdir())
    assert sorted(path.read_text() for path in downloaded) == sorted(make_text(index) for index in range(3))
    assert sorted(kept_documents(folder)) == sorted(make_text(index) for index in range(3))
    run_prepare(*flags, cwd=tmp_path)
    assert [len(requests_for(path)) for path in paths] == [1, 1, 1]
    assert dataset.read_meta(folder)["sources"][0]["url"] == server + paths[0]


def test_a_transfer_broken_midway_resumes_with_a_range_request(server, tmp_path):
    text = "".join(make_text(seed) for seed in range(60))  # ~230 kB: several 64 KiB blocks
    broken = serve("/broken.txt", text, plan=["broken"])
    other = serve("/other.txt", make_text(8))
    run_prepare("--source=url", f"--url={server}{broken},{server}{other}", "--tokenizer=byte", "--out_dir=out",
                cwd=tmp_path)
    (first, first_range), (second, second_range) = requests_for(broken)
    assert first_range is None
    resumed_at = int(second_range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(text.encode()) // 2
    assert text in kept_documents(tmp_path / "out")


def test_a_503_then_200_succeeds_after_a_retry(server, tmp_path):
    flaky = serve("/flaky.txt", make_text(9), plan=[503])
    other = serve("/steady.txt", make_text(10))
    result = run_prepare("--source=url", f"--url={server}{flaky},{server}{other}", "--tokenizer=byte",
                         "--out_dir=out", cwd=tmp_path)
    assert len(requests_for(flaky)) == 2
    assert "answered 503" in result.stderr and "retrying in 1 s" in result.stderr


def test_a_404_fails_clearly_and_leaves_no_dataset(server, tmp_path):
    result = run_prepare("--source=url", f"--url={server}/missing.txt", "--tokenizer=byte", "--out_dir=out",
                         cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert f"download failed: {server}/missing.txt answered 404" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_a_server_that_never_answers_fails_after_the_retries(tmp_path, monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never replies
    monkeypatch.setattr(crawl, "TIMEOUT_S", (0.3, 0.3))
    monkeypatch.setattr(crawl, "DOWNLOAD_ATTEMPTS", 2)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/silent.txt"
    with listener, pytest.raises(crawl.WebTextError, match=r"download failed after 2 tries: .*silent.txt.*timed out"):
        crawl.download(url, tmp_path / "silent.txt")
    assert not (tmp_path / "silent.txt").exists()
