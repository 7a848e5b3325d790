"""sources.py: prepare.py's sources, each a list of input files, and the readers that turn
one input file into documents (id, text, metadata), in file order.

    inputs, source = file_inputs("notes/,books/*.txt")   # source: meta.json's entry for them
    for input_file in inputs:
        for document in read_documents(input_file, "text"):
            print(document.id, len(document.text))

The sources: this Python's standard library (python_inputs), local files, folders and globs
(file_inputs), files downloaded from URLs (url_inputs) and Common Crawl's WET files, read as
they download (commoncrawl_inputs). The readers by file type: .txt .md .rst .py are one
document each, .jsonl one per line (its --text_field), .warc.wet(.gz) one per web page, and
pydoc's topics one per topic. A file that cannot be read is a SourceError, a flags.UserError:
the scripts print it as one line.
"""
import glob
import json
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from owngpt.flags import UserError
from owngpt.web import crawl
from owngpt.web.crawl import Dropped
from owngpt.workers import Progress


class SourceError(UserError):
    """An input that cannot be found or read: the message names the file or flag."""


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
STDLIB_SKIP = {"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
               "__pycache__", "pydoc_data"}


def split_list(spec):
    return [item.strip() for item in spec.split(",") if item.strip()]


@dataclass
class Document:
    id: str  # stable and unique: it names the document and decides its split
    text: str
    metadata: dict = field(default_factory=dict)  # where it came from (file, line, WARC headers)
    invalid_utf8: bool = False  # some bytes were not UTF-8 and became U+FFFD


@dataclass(frozen=True)
class InputFile:
    path: Path | None  # None for a file streamed from url
    name: str  # how its documents are named: a relative path, the path given, or the URL
    kind: str  # text (one document), jsonl (one per line), wet (one per record), pydoc_topics
    url: str = ""  # set for a Common Crawl WET file, read as it downloads


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
                raise SourceError(f"--{flag}: {item!r} matches no files")
        elif os.path.exists(item):
            matches = [item]
        else:
            raise SourceError(f"--{flag}: no such file or folder: {item}")
        for match in map(Path, matches):
            if match.is_dir():
                found = list(walk_files(match, skip={"__pycache__"}))
                supported = [path for path in found if input_kind(path.name)]
                skipped += len(found) - len(supported)
                paths += supported
            elif input_kind(match.name):
                paths.append(match)
            elif not glob.has_magic(item):
                raise SourceError(f"--{flag}: {match} is not a supported file type; expected "
                                   f"{', '.join(TEXT_SUFFIXES)}, .jsonl, .warc.wet or .warc.wet.gz")
            else:
                skipped += 1
    unique = list(dict.fromkeys(paths))  # a file named twice is read once
    inputs = [InputFile(path, path.as_posix(), input_kind(path.name)) for path in unique]
    return inputs, {"kind": "files", "input": spec, "files": len(inputs), "skipped_files": skipped}


def read_documents(input_file, text_field):
    """The documents of one input file, in file order."""
    readers = {"text": read_text, "jsonl": read_jsonl, "wet": read_wet, "pydoc_topics": read_pydoc_topics}
    try:
        yield from readers[input_file.kind](input_file, text_field)
    except (OSError, EOFError, ValueError) as error:
        raise SourceError(f"cannot read {input_file.name}: {error}") from None


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
                raise SourceError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(f"{where}: expected a JSON object with a string field "
                                   f"{text_field!r} (--text_field), found {found}")
            yield Document(where, record[text_field], {"file": input_file.name, "line": number}, invalid)


def read_wet(input_file, text_field):
    """One document per `conversion` record (the extracted text of one web page); its WARC
    headers (WARC-Target-URI, WARC-Date, WARC-Identified-Content-Language, ...) become the
    document's metadata. A record that cannot be read gives a crawl.Dropped in its place,
    and reading goes on with the next record."""
    if input_file.url:
        blocks = crawl.remote_blocks(input_file.url)
    else:
        blocks = crawl.file_blocks(input_file.path)
    records = crawl.warc_records(blocks, gzipped=input_file.name.endswith(".gz"))
    for number, record in enumerate(records, start=1):
        if isinstance(record, Dropped):
            yield record
        elif record[0].get("WARC-Type") == "conversion":
            headers, body = record
            text, invalid = decode_utf8(body)
            metadata = {"file": input_file.name, "record": number, **headers}
            yield Document(f"{input_file.name}:{number}", text, metadata, invalid)


def read_pydoc_topics(input_file, text_field):
    from pydoc_data.topics import topics
    for topic in sorted(topics):
        yield Document(f"{input_file.name}:{topic}", topics[topic], {"file": input_file.name})


def url_inputs(spec, downloads, previous_downloads):
    """The files at the URLs, downloaded into the build's downloads/ (crawl.py): one
    that an earlier run of the same dataset downloaded is not fetched again."""
    urls = split_list(spec)
    names = [crawl.download_name(url) for url in urls]  # checks every URL before downloading any
    downloads.mkdir(exist_ok=True)
    inputs, sources = [], []
    for url, name in zip(urls, names):
        path = crawl.fetch(url, downloads / name, previous_downloads / name, Progress("download", "MB"))
        inputs.append(InputFile(path, url, input_kind(name) or "text"))
        sources.append({"kind": "url", "url": url, "file": f"downloads/{name}", "bytes": path.stat().st_size})
    return inputs, sources


def commoncrawl_inputs(settings, crawl_id):
    """The first --wet_files WET files of the crawl, as inputs read while they download."""
    base_url = settings["cc_base_url"].rstrip("/") + "/"
    crawl_id, _, paths = crawl.wet_file_urls(crawl_id, settings["wet_files"], base_url, settings["cc_index_url"])
    return crawl_id, [InputFile(None, path, "wet", base_url + path) for path in paths]
