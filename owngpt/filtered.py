"""filtered.py: the documents a prepare.py run kept, stored part by part so that a failed run
can go on where it stopped, and how they divide into train and val.

    parts = FilteredParts(build / "filtered", fingerprint, part_names, resumable=True)
    part_file, tally = parts.new_part_file(), Tally()
    ...                                    # write kept documents (JSON lines), count in tally
    parts.record(name, part_file, tally)   # the part is finished: renamed into place, recorded
    for document in parts.documents(): ... # every kept document, in order

A part is one Common Crawl WET file, or all the files of a local source. It is finished or
absent, never half there: its file is renamed into place when complete and only then
listed in state.json, with its Tally and the fingerprint of the settings that made it; a
state written with another fingerprint is discarded.

    rule, why = split_rule(settings, parts.tally())  # whole documents to val, or their tails
    documents = document_tails(parts.documents(), 0.05) if rule == "tails" else parts.documents()
"""
import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

from owngpt.dataset import AtomicFile, atomic_write
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

    def drop(self, reason, document):
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason.partition(":")[0], [])
        if len(examples) < EXAMPLES and not isinstance(document, Dropped):
            examples.append(snippet(document.text))

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


class FilteredParts:
    """build/filtered/: the kept documents, part_000000.jsonl, ... (a JSON object per
    document: id, split, url, date, language, dedup key, text), and state.json, which
    lists the finished parts, their tallies and the settings that made them. A part file
    is renamed into place when complete, and only then recorded in state.json."""

    def __init__(self, folder, fingerprint, part_names, resumable):
        self.folder, self.fingerprint = folder, fingerprint
        folder.mkdir(exist_ok=True)
        self.parts = self._recorded(part_names) if resumable else []
        files = {part["file"] for part in self.parts} | {"state.json"}
        for entry in folder.iterdir():  # a part cut short by a crash, or another run's
            if entry.name not in files:
                entry.unlink()
        self._write_state()

    def _recorded(self, part_names):
        try:
            state = json.loads((self.folder / "state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        names = [part["name"] for part in state["parts"]]
        if state["fingerprint"] != self.fingerprint or names != part_names[:len(names)]:
            print(f"filter: {self.folder} holds parts made with other settings or files; "
                  f"starting over", file=sys.stderr)
            return []
        if names:
            print(f"filter: {len(names)} of {len(part_names)} parts were finished by an earlier "
                  f"run; going on with part {len(names) + 1}", file=sys.stderr)
        return state["parts"]

    def _write_state(self):
        state = {"fingerprint": self.fingerprint, "parts": self.parts}
        atomic_write(self.folder / "state.json", lambda f: f.write(json.dumps(state, indent=1).encode()))

    def new_part_file(self):
        return AtomicFile(self.folder / f"part_{len(self.parts):06d}.jsonl")

    def record(self, name, part_file, tally):
        part_file.commit()
        self.parts.append({"name": name, "file": part_file.path.name, "tally": tally.as_json()})
        self._write_state()

    def tally(self):
        total = Tally()
        for part in self.parts:
            total.add(Tally.from_json(part["tally"]))
        return total

    def documents(self):
        """The kept documents (dicts), in order."""
        for part in self.parts:
            with open(self.folder / part["file"], "rb") as lines:
                for line in lines:
                    yield json.loads(line.decode("utf-8", "surrogatepass"))


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
