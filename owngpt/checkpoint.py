"""The out folder: how train.py saves, rotates and records checkpoints, and how they are verified and loaded.

    out/<run>/ckpt_0000500.pt  the last keep_last checkpoints, one per save
    out/<run>/checkpoints.json their iteration, size and sha256, recorded once each file is complete
    out/<run>/ckpt.pt          the newest checkpoint  } hard links to a ckpt_<iter>.pt file,
    out/<run>/best.pt          the lowest val loss    } so they take no extra disk
    out/<run>/ckpt_0000500.dcp/ with sharded_checkpoint=True: each rank's rows (torch.distributed.checkpoint)
                               and train_state.pt; ckpt.pt and best.pt are then symbolic links to it

    checkpoint.write_checkpoint(Path("out/demo"), state, keep_last=2, is_best=True)
    path, state = checkpoint.newest_valid_checkpoint(Path("out/demo"))  # what resume starts from
    state = checkpoint.load_checkpoint_file("out/demo/best.pt")        # what sample.py reads

A checkpoint is a dict of tensors and plain values, so it loads with
torch.load(weights_only=True), which cannot run code: model (clean parameter names),
model_config, optimizer, scaler (or None), iter_num (iterations done), best_val_loss, config
(every key of train.py), tokenizer (meta.json's entry), rng (a list: each rank's Python, numpy,
torch and CUDA generator states, its batch sampler's included: rng_states), data
({"world_size"}: the rng list is exact for this many processes) and elapsed_s. A crash at any
moment leaves the previous checkpoint recorded and intact.

Below those: which checkpoint a run starts from (init_from, restarts), what a
checkpoint must agree on with the config and the dataset before it is used, and the one place
where checkpoints of older versions are brought up to date (upgrade), so that every reader
(train.py, sample.py, export.py) sees today's keys.
"""
import hashlib
import json
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path

try:
    import fcntl  # Unix; on Windows an out folder is not locked
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist

from owngpt.budget import TIMED_ITERATIONS
from owngpt.dataset import atomic_write
from owngpt.flags import UserError
from owngpt.hf import HF_PREFIX, read_hf_folder
from owngpt.parallel import shard_optimizer_state
from owngpt.runtime import from_rank_0, restarted
from owngpt.tokenizer import with_chat_tokens

MANIFEST_FILE = "checkpoints.json"
LOCK_FILE = "run.lock"  # held by the run that uses the folder: see claim_out_dir


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
    record_checkpoint(out_dir, record, keep_last, is_best)


def record_checkpoint(out_dir, record, keep_last, is_best):
    """Record a complete checkpoint in checkpoints.json, point ckpt.pt (and best.pt) at it,
    then delete all but the keep_last newest."""
    path = out_dir / record["file"]
    # records past this iteration belong to a run we went back from (resumed from an older one)
    entries = [entry for entry in read_manifest(out_dir) if entry["iter"] < record["iter"]]
    kept = (entries + [record])[-keep_last:]
    atomic_write(out_dir / MANIFEST_FILE, lambda file: file.write(json.dumps({"checkpoints": kept}, indent=1).encode()))
    link_as(path, out_dir / "ckpt.pt")
    if is_best:
        link_as(path, out_dir / "best.pt")
    kept_names = {entry["file"] for entry in kept}
    for stale in [*out_dir.glob("ckpt_*.pt"), *out_dir.glob("ckpt_*.dcp")]:
        if stale.name not in kept_names:
            remove(stale)


def remove(path):
    """Delete a file or a folder (a sharded checkpoint)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ----------------------------------------------------------------------------- sharded checkpoints
SHARDED_STATE_FILE = "train_state.pt"  # in a sharded checkpoint's folder: all but its tensors


def write_sharded_checkpoint(out_dir, checkpoint, keep_last, is_best):
    """Write ckpt_<iter>.dcp/, a folder in which every rank writes the rows it holds of each
    tensor (torch.distributed.checkpoint: a file per rank and a .metadata index of which rows
    each holds), so that no process ever holds the whole state; every rank calls it. Rank 0
    adds the rest (iteration, config, random states...) as train_state.pt. As write_checkpoint
    does, the folder is complete (written under a temporary name, each file flushed to disk,
    then renamed) before checkpoints.json records its size and sha256."""
    name = f"ckpt_{checkpoint['iter_num']:07d}.dcp"
    temporary, path = out_dir / f".{name}.tmp", out_dir / name
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main and temporary.exists():
        shutil.rmtree(temporary)  # before the save's first collective, so before any rank writes
    skeleton, tensors = split_tensors({key: checkpoint[key] for key in ("model", "optimizer")})
    skeleton = {**checkpoint, **skeleton}  # the random states go in train_state.pt: each rank's own, not rows
    import torch.distributed.checkpoint as dcp  # here, not at the top: ~0.6 s at import (owngpt/parallel.py)
    dcp.save(tensors, checkpoint_id=temporary)  # returns on every rank once all have written
    if not is_main:
        return
    torch.save(skeleton, temporary / SHARDED_STATE_FILE)
    for file in temporary.iterdir():
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())
    if path.exists():
        shutil.rmtree(path)  # this iteration saved before, by a run we went back from
    os.replace(temporary, path)
    record_checkpoint(out_dir, {"file": name, "iter": checkpoint["iter_num"], **folder_digest(path)}, keep_last,
                      is_best)


def split_tensors(state, path=""):
    """(state with each tensor replaced by None, {its path: tensor}); paths join keys with /."""
    if isinstance(state, (dict, list)):
        keys = state.keys() if isinstance(state, dict) else range(len(state))
        skeleton, tensors = {}, {}
        for key in keys:
            skeleton[key], more = split_tensors(state[key], f"{path}{key}/")
            tensors.update(more)
        return (skeleton if isinstance(state, dict) else list(skeleton.values())), tensors
    return (None, {path.rstrip("/"): state}) if torch.is_tensor(state) else (state, {})


def join_tensors(skeleton, tensors, path=""):
    """split_tensors undone."""
    if isinstance(skeleton, (dict, list)):
        keys = skeleton.keys() if isinstance(skeleton, dict) else range(len(skeleton))
        joined = {key: join_tensors(skeleton[key], tensors, f"{path}{key}/") for key in keys}
        return joined if isinstance(skeleton, dict) else list(joined.values())
    return tensors.get(path.rstrip("/"), skeleton)


def load_sharded_checkpoint(folder, rows_later=False):
    """A sharded checkpoint's whole state, as write_checkpoint's file holds it: read by this
    process alone (no process group needed), whatever number of processes wrote it. With
    rows_later, its tensors are left out (None) and rows_from names the folder: under FSDP,
    restore_training_state then reads each rank's rows alone (load_rows)."""
    skeleton = torch.load(folder / SHARDED_STATE_FILE, map_location="cpu", weights_only=True)
    if rows_later:
        return {**skeleton, "rows_from": str(folder)}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    stored = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in stored.items()
               if isinstance(entry, TensorStorageMetadata)}
    with warnings.catch_warnings():  # that it reads in one process, which is the intent
        warnings.simplefilter("ignore")
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return join_tensors(skeleton, tensors)


def load_rows(checkpoint, model, optimizer):
    """Read the rows this rank holds of every tensor of the sharded model and optimizer from
    checkpoint's folder (a collective: DCP reshards to any number of processes): the model's
    in place, the optimizer's into checkpoint["optimizer"], for its load_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    stored = dcp.FileSystemReader(checkpoint["rows_from"]).read_metadata().state_dict_metadata
    targets = {f"model/{name}": tensor for name, tensor in model.state_dict().items()}  # its parameters themselves
    for key, entry in stored.items():  # optimizer/[part/]state/<parameter's index>/<name>
        if key.startswith("optimizer/") and isinstance(entry, TensorStorageMetadata):
            *part, _, index, _ = key.split("/")[1:]
            owner = optimizer.parts[part[0]] if part else optimizer  # MuonAndAdamW's part, or the optimizer
            param = [param for group in owner.param_groups for param in group["params"]][int(index)]
            targets[key] = (torch.zeros_like(param) if tuple(entry.size) == tuple(param.shape)
                            else torch.empty(entry.size, dtype=entry.properties.dtype))  # a step count
    dcp.load(targets, checkpoint_id=checkpoint["rows_from"])
    checkpoint["optimizer"] = join_tensors(checkpoint["optimizer"], {key.removeprefix("optimizer/"): tensor
                                                                     for key, tensor in targets.items()})


def folder_digest(folder):
    """{"bytes", "sha256"} of a folder's files, taken in name order, each name hashed with its bytes."""
    digest, size = hashlib.sha256(), 0
    for file in sorted(folder.iterdir()):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def link_as(source, alias):
    """Make alias name the same file as source, atomically: a hard link (no extra disk),
    or a copy on file systems without hard links; a folder (a sharded checkpoint) gets a
    symbolic link."""
    temporary = alias.with_name(alias.name + ".link")
    temporary.unlink(missing_ok=True)
    if source.is_dir():
        os.symlink(source.name, temporary)
        os.replace(temporary, alias)
        return
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


def load_checkpoint_file(path, rows_later=False):
    """torch.load with weights_only=True (tensors and plain values, never code), upgraded; a
    sharded checkpoint's folder is read whole, or without its tensors (load_sharded_checkpoint)."""
    try:
        if Path(path).is_dir():
            return upgrade(load_sharded_checkpoint(Path(path), rows_later))
        return upgrade(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as error:  # any failure to unpickle means the same thing: not a usable checkpoint
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # how weights_only names a Python object it met
        if refused:
            raise CheckpointError(f"{path} does not load as a checkpoint: it holds a Python object ({refused[1]}), "
                                  "and loading one can run any code, so it is refused (train.py's checkpoints hold "
                                  "only tensors and plain values)") from error
        raise CheckpointError(f"{path} does not load as a checkpoint: {type(error).__name__}: {error}") from error


def checkpoint_problem(path, entry):
    """What is wrong with a checkpoint file (or a sharded checkpoint's folder) against its record, or None."""
    if path.is_dir():
        return None if folder_digest(path) == {key: entry[key] for key in ("bytes", "sha256")} else \
            "its files' size or sha256 differ from those recorded when it was written"
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


def newest_valid_checkpoint(out_dir, rows_later=False):
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
                return path, load_checkpoint_file(path, rows_later)
            except CheckpointError as error:
                problem = str(error)
        print(f"warning: skipping damaged checkpoint {path}: {problem}", file=sys.stderr)
    raise CheckpointError(f"no valid checkpoint in {out_dir}: all {len(entries)} recorded ones are damaged (above)")


# ----------------------------------------------------------------------------- older versions
# What a key meant before it existed: each was added with GPT-2's 2019 recipe as its behaviour,
# and the modern recipe became the default later.
OLDER_MODEL_CONFIG = {"block": "gpt2", "value_embeddings": False}
OLDER_CONFIG = {"block": "gpt2", "value_embeddings": False, "optimizer": "adamw", "lr_schedule": "cosine",
                "patience": 0}


def upgrade(checkpoint):
    """A checkpoint of an older version with today's keys, as it was trained."""
    if isinstance(checkpoint, dict):
        for key, older in (("model_config", OLDER_MODEL_CONFIG), ("config", OLDER_CONFIG)):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = {**older, **checkpoint[key]}
        config = checkpoint.get("config")
        if isinstance(config, dict) and "fitted" not in checkpoint:  # before the run recorded what it fitted:
            timed = config.get("max_time") and checkpoint.get("iter_num", 0) >= TIMED_ITERATIONS[1]
            checkpoint["fitted"] = {"dropout": config.get("dropout", 0.0),  # its dropout, not the data's
                                    **({"max_iters": config["max_iters"]} if timed else {})}  # fitted to max_time
            checkpoint.setdefault("evals_since_best", 0)
    return checkpoint


def saved_before_embedding_lr(checkpoint):
    """Whether checkpoint's AdamW has the two groups it had before the untied embedding got
    a group of its own: such a run resumes with its embedding at learning_rate."""
    saved = checkpoint["optimizer"]
    return len(saved.get("adamw", saved)["param_groups"]) == 2


# ----------------------------------------------------------------------------- starting a run
def prepare_out_dir(out, folder, tokenizer_info, resuming):
    """Create out_dir and claim it for this run; refuse to start a new run over a recorded one;
    remove what a killed save left (atomic_write's temporary .<name>.<random>.tmp files); copy
    a trained tokenizer, so sample.py needs only this folder."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"out_dir {out} is a file, not a folder: choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # an unwritable out_dir shows now, not at the first save
    except OSError as error:
        raise CheckpointError(f"out_dir {out} is not writable: {error.strerror or error}") from None
    claim_out_dir(out)
    if not resuming and read_manifest(out):
        raise CheckpointError(f"{out} already holds checkpoints of a run: continue it with init_from=resume, "
                              "or choose another out_dir")
    for leftover in out.glob(".*.tmp"):
        remove(leftover)
    if tokenizer_info.get("file"):
        source = folder / tokenizer_info["file"]
        atomic_write(out / tokenizer_info["file"], lambda file: file.write(source.read_bytes()))


def init_from_problem(value):
    """What init_from may be (a flags check: None when valid)."""
    return None if value in ("scratch", "resume") or os.path.isfile(value) or \
        os.path.isfile(os.path.join(value, SHARDED_STATE_FILE)) or \
        (value.startswith(HF_PREFIX) and os.path.isdir(value.removeprefix(HF_PREFIX))) else \
        "scratch, resume, the path of a checkpoint file (or a sharded checkpoint's folder) or hf:FOLDER (a Hugging " \
        "Face GPT-2 or NanoChat folder)"


_claims = {}  # out folder -> the open lock file by which this process holds it


def claim_out_dir(out):
    """One run per out folder: an exclusive flock on out/run.lock, which the kernel drops when
    the process ends, however it ends (kill -9 included), so no stale claim is ever left. A
    folder another live run holds is refused, naming that run's process."""
    if fcntl is None or out.resolve() in _claims:
        return
    lock = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not said which"
        lock.close()
        raise CheckpointError(f"{out} is in use by another run, {holder}: wait for it to end, "
                              "or choose another out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)})\n")
    lock.flush()
    _claims[out.resolve()] = lock


def release_out_dirs():
    """Let the next run have the folders this process holds."""
    while _claims:
        _claims.popitem()[1].close()


def continue_after_restart(cfg, runtime):
    """torchrun --max-restarts=N starts the whole group again, with the same command, when a
    process fails, and Slurm runs a requeued job's script again (launch/train_slurm.sbatch). A
    restarted run goes on from the newest valid checkpoint in out_dir, which the attempt before
    wrote, instead of starting over: init_from becomes resume. Returns whether it did (with no
    checkpoint yet, the run starts as configured)."""
    restart = restarted()
    if not restart or cfg.eval_only or cfg.init_from == "resume" or not read_manifest(Path(cfg.out_dir)):
        return False
    if runtime.is_main:
        print(f"{restart}: continuing from the newest valid checkpoint in {cfg.out_dir}", flush=True)
    cfg.init_from = "resume"
    return True


def checkpoint_to_start(cfg, runtime):
    """(path, checkpoint) for init_from=resume, a path or hf:FOLDER, else (None, None). Under
    torchrun rank 0 picks the checkpoint to resume (verifying it) and the others load that file."""
    if cfg.init_from == "scratch":
        return None, None
    if cfg.init_from.startswith(HF_PREFIX):
        folder = cfg.init_from.removeprefix(HF_PREFIX)
        return Path(folder), read_hf_folder(folder)
    if cfg.init_from != "resume":
        return Path(cfg.init_from), load_checkpoint_file(cfg.init_from)
    rows_later = cfg.parallelism == "fsdp" and runtime.world_size > 1 and not cfg.eval_only  # read by each rank
    path, checkpoint = newest_valid_checkpoint(Path(cfg.out_dir), rows_later) if runtime.is_main else (None, None)
    path = Path(from_rank_0(str(path), runtime))
    return path, checkpoint if runtime.is_main else load_checkpoint_file(path, rows_later)


# ----------------------------------------------------------------------------- agreeing with the config
def check_same_run(checkpoint, path, cfg, defaults):
    """A restart resumes only a checkpoint of this very command (the first attempt refuses to
    start over another run's checkpoints, so these may not be its own). out_dir may differ:
    the run may have been moved. cfg holds the values the run fitted (max_iters...) already."""
    for key, value in vars(cfg).items():
        if key in ("init_from", "out_dir"):
            continue
        if checkpoint["config"].get(key, defaults[key]) != value:
            raise CheckpointError(f"{restarted()}: {path} belongs to another run ({key} is "
                                  f"{checkpoint['config'].get(key)!r} there, {value!r} here): choose another out_dir")


def add_chat_tokens(checkpoint, path, tokenizer_info, is_main):
    """A checkpoint whose tokenizer is the dataset's but for the chat tokens (one trained
    before they were reserved, GPT-2's, a Hugging Face folder's: owngpt/chat.py) is to fine-tune
    on conversations with them: its tokenizer and vocab_size become the dataset's, and the old
    vocabulary size is returned, for grown_weights. None when it has them, or is another tokenizer."""
    trained_with = checkpoint["tokenizer"]
    if "chat_tokens" in trained_with or "chat_tokens" not in tokenizer_info:
        return None
    grown = with_chat_tokens(trained_with)
    if any(grown[field] != tokenizer_info.get(field) for field in ("kind", "vocab_size", "eot_id", "sha256")
           if field in trained_with):
        return None  # another tokenizer: check_checkpoint_fits says which field differs
    rows = trained_with["vocab_size"]
    checkpoint["tokenizer"] = grown
    checkpoint["model_config"] = {**checkpoint["model_config"], "vocab_size": grown["vocab_size"]}
    if is_main:
        print(f"{path} has no chat tokens: {', '.join(grown['chat_tokens'])} are ids {rows}-{grown['vocab_size'] - 1}, "
              f"and the token embedding and head grow from {rows:,} to {grown['vocab_size']:,} rows, the new ones "
              "initialised as the rest", flush=True)
    return rows


def grown_weights(state, model, rows):
    """A state dict for a vocabulary of rows tokens, for model, whose vocabulary has more after
    them: every table of the vocabulary (token embedding, head, value embeddings) keeps its
    first rows and takes the rest from the model's own initialisation."""
    tables = ["transformer.wte.weight", "lm_head.weight", *(f"value_embeds.{layer}.weight"
                                                            for layer in range(len(model.value_embeds)))]
    grown, fresh = dict(state), model.state_dict()
    for name in tables:
        grown[name] = fresh[name].clone()
        grown[name][:rows] = state[name][:rows]
    return grown


def check_checkpoint_fits(checkpoint, path, model_config, tokenizer_info, folder, text=False):
    """The dataset must use the checkpoint's tokenizer and the config its architecture. A text
    dataset (text=True) never encodes to its tokenizer's chat tokens, so a model whose tokenizer
    is the same but for them (one trained before they were reserved, its Hugging Face export)
    fits it as it is."""
    trained_with, chat_tokens = checkpoint["tokenizer"], len(tokenizer_info.get("chat_tokens", {}))
    if text and trained_with.get("vocab_size") == tokenizer_info["vocab_size"] - chat_tokens:
        tokenizer_info = {**tokenizer_info, "vocab_size": trained_with["vocab_size"]}
    for field in ("kind", "vocab_size", "eot_id", "sha256"):  # a Hugging Face folder tells only the middle two
        if field in trained_with and trained_with[field] != tokenizer_info.get(field):
            raise CheckpointError(f"{path} was trained with a different tokenizer than {folder} uses: {field} is "
                                  f"{trained_with.get(field)!r} there and {tokenizer_info.get(field)!r} here")
    for field in ("block", "value_embeddings", "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias"):
        trained = checkpoint["model_config"].get(field, getattr(model_config, field))  # Hugging Face: what it has
        if trained != getattr(model_config, field):
            raise CheckpointError(f"{path} has {field}={trained!r} but the config says "
                                  f"{field}={getattr(model_config, field)!r}: pass the config it was trained with")


def restore_training_state(checkpoint, path, model, optimizer, optimizer_kind, scaler, generator, runtime):
    """Load the optimizer, the loss scaler and this process's random states from checkpoint
    (and the model, from a sharded checkpoint read by rows: load_rows); return (iter_num,
    best_val_loss, elapsed_s) as it holds them."""
    trained_with = checkpoint["config"]["optimizer"]
    if trained_with != optimizer_kind:
        raise CheckpointError(f"{path} was trained with optimizer={trained_with}, this run asks for "
                              f"optimizer={optimizer_kind}: resume with the optimizer it was trained with")
    if "rows_from" in checkpoint:
        load_rows(checkpoint, model, optimizer)
    optimizer.load_state_dict(checkpoint["optimizer"])  # the whole state as one process saved it, or this rank's rows
    shard_optimizer_state(optimizer)  # FSDP: each rank keeps its rows
    if scaler and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    if checkpoint["data"]["world_size"] == runtime.world_size:
        restore_rng_states(checkpoint["rng"][runtime.rank], generator, runtime.device)
        exactness = "exactly"
    else:
        exactness = (f"with fresh random streams (saved by {checkpoint['data']['world_size']} processes, "
                     f"resumed by {runtime.world_size})")
    if runtime.is_main:
        print(f"resuming from {path} at iteration {checkpoint['iter_num']}, {exactness}", flush=True)
    return checkpoint["iter_num"], checkpoint["best_val_loss"], checkpoint["elapsed_s"]
