"""filtered.py: the documents prepare.py's filters kept, stored part by part, so that the
filtering can run as many tasks on many machines, each writing its own parts, and a failed
task can go on where it stopped; then merged, deduplicated, and divided into train and val.

    parts = PartsFolder(folder, fingerprint, private=True)   # manifest.json: the settings
    if not parts.finished(index):
        part = parts.new_part(index, name)                 # a temporary file, its header written
        ...                                                # kept documents, as JSON lines
        parts.finish_part(part, tally, seconds)            # renamed into place: part_000017.jsonl
    merged = MergedParts(parts, count, Deduplicator(settings), max_docs, progress)
    for document in merged.documents(): ...               # what deduplication kept, in order

A part is one Common Crawl WET file, or all the files of a local source. It is finished or
absent, never half there, and names the fingerprint of the settings that made it.

    rule, why = split_rule(settings, merged.tally())  # whole documents to val, or their tails
    documents = document_tails(merged.documents(), 0.05) if rule == "tails" else merged.documents()
"""
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from owngpt.dataset import AtomicFile
from owngpt.flags import UserError
from owngpt.web import filters
from owngpt.web.crawl import Dropped

EXAMPLES = 2  # dropped documents shown per filter in report.md


def key_to_json(key):
    return [key.exact_key, *key.band_keys]


def key_from_json(value):
    return filters.DedupSignature(value[0], tuple(value[1:]))


def kept_document(split, document, text, key):
    """The JSON object a part file holds for one kept document."""
    headers = document.metadata
    languages = headers.get(filters.LANGUAGE_HEADER)
    return {"id": document.id, "split": split, "url": headers.get("WARC-Target-URI"),
            "date": headers.get("WARC-Date"),
            "language": languages.split(",")[0].strip() if languages else None,
            "key": key_to_json(key), "text": text}


@dataclass
class Tally:
    """What was read, kept and dropped, with the start of the first documents each filter
    dropped (the part of the reason before ':' names the filter)."""
    documents_read: int = 0
    bytes_read: int = 0
    invalid_utf8: int = 0
    kept: int = 0
    kept_bytes: int = 0
    kept_val: int = 0  # of the kept documents, those the hash of their id put in val
    kept_val_bytes: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def read(self, document):
        self.documents_read += 1
        if not isinstance(document, Dropped):
            self.bytes_read += len(document.text.encode("utf-8", "surrogatepass"))
            self.invalid_utf8 += document.invalid_utf8

    def keep(self, split, text):
        text_bytes = len(text.encode("utf-8", "surrogatepass"))
        self.kept, self.kept_bytes = self.kept + 1, self.kept_bytes + text_bytes
        if split == "val":
            self.kept_val, self.kept_val_bytes = self.kept_val + 1, self.kept_val_bytes + text_bytes

    def drop(self, reason, text):
        """text: the dropped document's, or None for a record that could not be read."""
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason.partition(":")[0], [])
        if len(examples) < EXAMPLES and text is not None:
            examples.append(snippet(text))

    def add(self, other):
        for name in ("documents_read", "bytes_read", "invalid_utf8", "kept", "kept_bytes", "kept_val", "kept_val_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped.update(other.dropped)
        for name, examples in other.examples.items():
            mine = self.examples.setdefault(name, [])
            mine += examples[:EXAMPLES - len(mine)]

    def as_json(self):
        return {**vars(self), "dropped": dict(self.dropped)}

    @classmethod
    def from_json(cls, value):
        return cls(**{**value, "dropped": Counter(value["dropped"])})


def snippet(text, length=160):
    """The start of a text on one line, emails and IPs masked: an example for report.md."""
    line = filters.mask_pii(" ".join(text[:length * 2].split()))
    return line[:length] + ("..." if len(line) > length else "")


class PartsFolder:
    """A folder of filtered parts: part_000000.jsonl, part_000001.jsonl, ... named by the
    part's index (a WET file's in the crawl's wet.paths.gz), and manifest.json, which holds
    the fingerprint of the settings every part there was made with.

    A part file is one JSON object per line: a header (the part's index, its name and the
    fingerprint), then every document the filters kept, in record order (id, split, url,
    date, language, dedup key, text), then its Tally and the seconds it took. It is written
    under a temporary name and renamed into place when complete, so a part is there whole or
    not at all, and tasks on several machines can share the folder."""

    def __init__(self, folder, fingerprint, private):
        """private: a build folder's own parts, started over when the settings changed; a
        folder given with --parts may hold other tasks' work, so a mismatch there is an error."""
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        recorded = read_manifest(self.folder)
        if recorded is not None and recorded["fingerprint"] != fingerprint:
            if not private:
                raise self._other_settings(recorded["fingerprint"])
            print(f"filter: {self.folder} holds parts made with other settings; starting over", file=sys.stderr)
            shutil.rmtree(self.folder)
            self.folder.mkdir()
            recorded = None
        if recorded is None:
            self._create_manifest()

    def _create_manifest(self):
        """Writes manifest.json unless another task got there first (a hard link fails
        when the name exists, so of two tasks starting together exactly one writes it)."""
        manifest = AtomicFile(self.folder / MANIFEST)
        manifest.file.write(json.dumps({"fingerprint": self.fingerprint}, indent=1).encode() + b"\n")
        manifest.file.flush()
        os.fsync(manifest.file.fileno())
        try:
            os.link(manifest.temporary, manifest.path)
        except FileExistsError:
            recorded = read_manifest(self.folder)["fingerprint"]
            if recorded != self.fingerprint:
                raise self._other_settings(recorded) from None
        finally:
            manifest.discard()

    def _other_settings(self, recorded):
        return UserError(f"{self.folder} holds parts made with other settings ({differences(recorded, self.fingerprint)}): "
                         f"run with those, or give another --parts folder")

    def path(self, index):
        return self.folder / f"part_{index:06d}.jsonl"

    def finished(self, index):
        """Whether part index is there, made with these settings."""
        path = self.path(index)
        if not path.exists():
            return False
        self.check_header(path, part_header(path))
        return True

    def check_header(self, path, header):
        """A part made with other settings than the folder's is an error, wherever it is met."""
        if header["fingerprint"] != self.fingerprint:
            raise UserError(f"{path} was made with other settings than {self.folder / MANIFEST} "
                            f"({differences(header['fingerprint'], self.fingerprint)}): delete it to make it again")

    def new_part(self, index, name):
        """An AtomicFile for part index with its header written; stale temporary files of
        the same part (a task killed while writing it) are removed first."""
        for stale in self.folder.glob(f".{self.path(index).name}.*.tmp"):
            stale.unlink(missing_ok=True)
        part = AtomicFile(self.path(index))
        part.file.write(json_line({"part": index, "name": name, "fingerprint": self.fingerprint}))
        return part

    @staticmethod
    def finish_part(part, tally, seconds):
        part.file.write(json_line({"tally": tally.as_json(), "seconds": round(seconds, 3)}))
        part.commit()

    def missing(self, count):
        return [self.path(index).name for index in range(count) if not self.path(index).exists()]


MANIFEST = "manifest.json"


def read_manifest(folder):
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def differences(recorded, wanted):
    """The settings two fingerprints disagree on, as "--flag=there (here: value)"."""
    flat = lambda fingerprint: {**fingerprint["flags"], **(fingerprint["web_filters"] or {}),
                                "crawl": fingerprint["crawl"], "web_filters": fingerprint["web_filters"] is not None}
    there, here = flat(recorded), flat(wanted)
    names = [name for name in sorted(there.keys() | here.keys()) if there.get(name) != here.get(name)]
    return ", ".join(f"--{name}={there.get(name)} there, {here.get(name)} here" for name in names)


def json_line(value):
    """A part file's line: JSON, UTF-8, a lone surrogate of the text kept as it was read."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def part_header(path):
    with open(path, "rb") as lines:
        return json.loads(lines.readline())


def part_lines(path):
    """The header, then each kept document, then the footer (tally, seconds), as dicts."""
    with open(path, "rb") as lines:
        for line in lines:
            yield json.loads(line.decode("utf-8", "surrogatepass"))


class MergedParts:
    """The documents of parts 0..count-1 that survive deduplication, and the tally of all.

    Deduplication runs over the parts in order (part index, then record), so the first copy
    of a text in that order is the one kept: the same documents whatever the number of
    tasks that made the parts. With max_docs, the documents the filters kept after the
    max_docs-th one that deduplication kept are counted as dropped by "max_docs"."""

    def __init__(self, parts, count, deduplicator, max_docs, progress):
        missing = parts.missing(count)
        if missing:
            raise UserError(f"{len(missing)} of {count} parts are missing from {parts.folder}: "
                            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; run the "
                            f"stage-one tasks that make them (the same command, with --task and --tasks)")
        self.parts, self.count = parts, count
        self.names, self.kept_lines, self.seconds = [], [], 0.0
        self._tally = Tally()
        dedup = Tally()  # the documents deduplication and max_docs dropped
        for index in range(count):
            path = parts.path(index)
            lines = part_lines(path)
            header = next(lines)
            parts.check_header(path, header)
            self.names.append(header["name"])
            kept = bytearray()  # one flag per document line of the part
            for document in lines:
                if "tally" in document:
                    self._tally.add(Tally.from_json(document["tally"]))
                    self.seconds += document["seconds"]
                    break
                reason = "max_docs" if max_docs and self._tally.kept >= max_docs else \
                    deduplicator.check(key_from_json(document["key"]))
                if reason:
                    dedup.drop(reason, document["text"])
                else:
                    self._tally.keep(document["split"], document["text"])
                kept.append(reason is None)
            self.kept_lines.append(kept)
            progress.update(index + 1, f"{self._tally.kept:,} documents kept")
        self._tally.add(dedup)

    def tally(self):
        return self._tally

    def documents(self):
        """The kept documents (dicts), in order."""
        for index, kept in enumerate(self.kept_lines):
            lines = part_lines(self.parts.path(index))
            next(lines)
            for document, keep in zip(lines, kept):
                if keep:
                    yield document


# ----------------------------------------------------------------------------- train and val
def split_of(document_id, val_fraction):
    """'val' for a fixed, pseudo-random val_fraction of document ids, else 'train'."""
    digest = hashlib.sha256(document_id.encode("utf-8", "surrogatepass")).digest()
    return "val" if int.from_bytes(digest[:8], "big") < val_fraction * 2 ** 64 else "train"


# The val split is whole documents, picked by a hash of their ids, when the hash gives val
# at least MIN_VAL_DOCUMENTS documents and at least half the asked share of the text, and
# leaves train some. With fewer documents one odd document decides the val loss, and whether
# val gets any document at all is luck: a corpus of n documents gets none with probability
# (1 - val_fraction)^n, 36% for 20 documents at the default 5%. Otherwise each document gives
# the last val_fraction of its text to val (nanoGPT's 90/10 cut of one file, for every
# document), so both splits exist and never share text.
MIN_VAL_DOCUMENTS = 4


def split_rule(settings, tally):
    """("documents" | "tails" | "val_input", why): how the kept documents become the splits."""
    if settings["val_input"]:
        return "val_input", f"the documents of --val_input={settings['val_input']}"
    asked = settings["val_fraction"]
    hashed = (f"the hash of the document ids put {tally.kept_val:,} of {tally.kept:,} kept documents "
              f"({tally.kept_val_bytes / max(tally.kept_bytes, 1):.1%} of the text) in val")
    if (MIN_VAL_DOCUMENTS <= tally.kept_val < tally.kept
            and tally.kept_val_bytes >= asked / 2 * tally.kept_bytes):
        return "documents", f"whole documents: {hashed}"
    return "tails", (f"the last {asked:.0%} of each document's text: {hashed}, too few for a useful "
                     f"val split (at least {MIN_VAL_DOCUMENTS} documents and {asked / 2:.1%} of the text)")


def document_tails(documents, val_fraction):
    """Each document cut in two: its head for train, its last val_fraction for val (one
    character at least). The cut moves back to the start of its line when that at most
    doubles the tail."""
    for document in documents:
        text = document["text"]
        cut = min(round(len(text) * (1 - val_fraction)), len(text) - 1)
        line_start = text.rfind("\n", 0, cut) + 1
        if line_start > 0 and cut - line_start < len(text) - cut:
            cut = line_start
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            if part:
                yield {**document, "split": split, "text": part}


def check_splits(splits, val_input):
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    if splits["val"]["documents"] == 0 and val_input:
        raise UserError(f"--val_input={val_input} gave no documents (after filtering)")
    for split, summary in splits.items():
        if summary["documents"] == 0:
            raise UserError(f"the {split} split is empty: {documents} document(s) kept, but train "
                               f"and val need some text each; add text or use --val_input")
