"""The out folder: how train.py saves, rotates and records checkpoints, and how they are verified and loaded.

    out/<run>/ckpt_0000500.pt  the last keep_last checkpoints, one per save
    out/<run>/checkpoints.json their iteration, size and sha256, recorded once each file is complete
    out/<run>/ckpt.pt          the newest checkpoint  } hard links to a ckpt_<iter>.pt file,
    out/<run>/best.pt          the lowest val loss    } so they take no extra disk

    checkpoint.write_checkpoint(Path("out/demo"), state, keep_last=2, is_best=True)
    path, state = checkpoint.newest_valid_checkpoint(Path("out/demo"))  # what resume starts from
    state = checkpoint.load_checkpoint_file("out/demo/best.pt")        # what sample.py reads

A checkpoint is a dict of tensors and plain values, so it loads with
torch.load(weights_only=True), which cannot run code; train.py's save_checkpoint lists its keys,
among them every random state (rng_states) so that a resumed run draws the same numbers. A
crash at any moment leaves the previous checkpoint recorded and intact.
"""
import hashlib
import json
import os
import random
import re
import shutil
import sys

import numpy as np
import torch

from owngpt.dataset import atomic_write
from owngpt.flags import UserError

MANIFEST_FILE = "checkpoints.json"


class CheckpointError(UserError):
    """A checkpoint or checkpoint record that is missing, damaged or not train.py's."""


# ----------------------------------------------------------------------------- save and rotate
class HashingWriter:
    """A file wrapper that counts and hashes the bytes written through it."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()


def write_checkpoint(out_dir, checkpoint, keep_last, is_best):
    """Write ckpt_<iter>.pt crash-safely and record it; point ckpt.pt (and best.pt) at it;
    delete all but the keep_last newest.

    Order matters: the file is complete on disk (atomic rename) before checkpoints.json
    records its size and sha256, and older ones are deleted only after that. A crash at any
    moment leaves the previous checkpoint recorded and intact.
    """
    record = {"file": f"ckpt_{checkpoint['iter_num']:07d}.pt", "iter": checkpoint["iter_num"]}
    path = out_dir / record["file"]

    def write(file):
        writer = HashingWriter(file)
        try:
            torch.save(checkpoint, writer)
        except RuntimeError as error:  # torch reports a failed write this way; the OSError behind it says why
            raise error.__context__ if isinstance(error.__context__, OSError) else error
        record.update(bytes=writer.size, sha256=writer.sha256.hexdigest())

    atomic_write(path, write)
    # records past this iteration belong to a run we went back from (resumed from an older one)
    entries = [entry for entry in read_manifest(out_dir) if entry["iter"] < record["iter"]]
    kept = (entries + [record])[-keep_last:]
    atomic_write(out_dir / MANIFEST_FILE, lambda file: file.write(json.dumps({"checkpoints": kept}, indent=1).encode()))
    link_as(path, out_dir / "ckpt.pt")
    if is_best:
        link_as(path, out_dir / "best.pt")
    kept_names = {entry["file"] for entry in kept}
    for stale in out_dir.glob("ckpt_*.pt"):
        if stale.name not in kept_names:
            stale.unlink()


def link_as(source, alias):
    """Make alias name the same file as source, atomically: a hard link (no extra disk),
    or a copy on file systems without hard links."""
    temporary = alias.with_name(alias.name + ".link")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
        os.replace(temporary, alias)
    except OSError:
        atomic_write(alias, lambda file: file.write(source.read_bytes()))


def check_free_space(out_dir, model, keep_last):
    """Refuse to start when out_dir's disk cannot hold the checkpoints to come. At a save it
    holds the keep_last kept ones, best.pt (which may be an older one) and the one being
    written, each about three times the weights (AdamW keeps two moments per weight); the
    checkpoints already there count as room."""
    checkpoint_bytes = 3 * sum(param.numel() * param.element_size() for param in model.parameters())
    on_disk = {path.stat().st_ino: path.stat().st_size  # by inode: ckpt.pt and best.pt are hard links
               for path in [*out_dir.glob("ckpt_*.pt"), out_dir / "best.pt"] if path.exists()}
    needed = (keep_last + 2) * checkpoint_bytes - sum(on_disk.values())
    free = shutil.disk_usage(out_dir).free
    if free < needed:
        raise CheckpointError(f"{out_dir} has {free / 1e6:,.1f} MB free, but its checkpoints will need "
                              f"{needed / 1e6:,.1f} MB more ({keep_last + 2} of ~{checkpoint_bytes / 1e6:,.1f} MB: "
                              f"keep_last={keep_last}, best.pt and the one being written): make room, lower "
                              "keep_last, or choose another out_dir")


# ----------------------------------------------------------------------------- random states
def rng_states(generator, device):
    """Every random state a step draws from, so a resumed run draws the same numbers.
    Plain types and tensors only (numpy's key array becomes a list): weights_only loads them."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
              "torch": torch.get_rng_state(), "loader": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states, generator, device):
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    generator.set_state(states["loader"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# ----------------------------------------------------------------------------- verify and load
def read_manifest(out_dir):
    """The records of checkpoints.json, oldest first ([] when there is none)."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["checkpoints"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path} is not a checkpoint record written by train.py ({error})")


def load_checkpoint_file(path):
    """torch.load with weights_only=True: tensors and plain values, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to unpickle means the same thing: not a usable checkpoint
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # how weights_only names a Python object it met
        if refused:
            raise CheckpointError(f"{path} does not load as a checkpoint: it holds a Python object ({refused[1]}), "
                                  "and loading one can run any code, so it is refused (train.py's checkpoints hold "
                                  "only tensors and plain values)") from error
        raise CheckpointError(f"{path} does not load as a checkpoint: {type(error).__name__}: {error}") from error


def checkpoint_problem(path, entry):
    """What is wrong with a checkpoint file against its record, or None."""
    if not path.is_file():
        return "the file is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"it has {path.stat().st_size:,} bytes, {entry['bytes']:,} were written"
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != entry["sha256"]:
        return "its sha256 differs from the one recorded when it was written"
    return None


def newest_valid_checkpoint(out_dir):
    """The newest recorded checkpoint whose size and sha256 match the record and which loads.
    Damaged ones are reported on stderr and passed over. Returns (path, checkpoint)."""
    entries = read_manifest(out_dir)
    if not entries:
        raise CheckpointError(f"init_from=resume: {out_dir} holds no recorded checkpoint ({MANIFEST_FILE}); use "
                              "init_from=scratch, or init_from=path/to/ckpt.pt to start from a checkpoint's weights")
    for entry in reversed(entries):
        path = out_dir / entry["file"]
        problem = checkpoint_problem(path, entry)
        if problem is None:
            try:
                return path, load_checkpoint_file(path)
            except CheckpointError as error:
                problem = str(error)
        print(f"warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr)
    raise CheckpointError(f"no valid checkpoint in {out_dir}: all {len(entries)} recorded ones are damaged (above)")
