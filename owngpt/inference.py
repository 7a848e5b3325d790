"""What sample.py and chat.py share: a trained model and its tokenizer, loaded from the out
folder train.py wrote (or a Hugging Face folder), and the checks of the sampling flags.

    model, tokenizer, checkpoint = load_trained("out/demo", "best", torch.device("cpu"))
    model, tokenizer, checkpoint = load_trained("hf:hf/demo", "best", device)   # ckpt unused

The checkpoint describes its tokenizer and train.py copies a trained BPE's file next to it,
so the out folder is all that is needed.
"""
from pathlib import Path

from model import GPT, GPTConfig
from owngpt import flags
from owngpt.checkpoint import load_checkpoint_file
from owngpt.hf import HF_PREFIX, read_hf_folder, read_tokenizer_json
from owngpt.runtime import available_devices
from owngpt.tokenizer import load_tokenizer

CHECKPOINT_FILES = {"best": "best.pt", "latest": "ckpt.pt"}
# the flags every script that generates takes, checked before the model is loaded
SAMPLING_CHECKS = {
    "ckpt": flags.one_of(*CHECKPOINT_FILES),
    "max_new_tokens": flags.at_least(1),
    "temperature": flags.all_of(flags.finite, flags.at_least(0)),
    "top_k": flags.at_least(0),
    "top_p": lambda value: None if 0 < value <= 1 else "greater than 0 and at most 1",
    "seed": flags.at_least(0),
    "device": lambda device: flags.one_of("auto", *available_devices())(device),  # what this machine has
}


class LoadError(flags.UserError):
    """A checkpoint or folder that cannot be loaded as a model: printed without a traceback."""


def model_of(checkpoint, path, device):
    """The GPT a checkpoint holds, in eval mode on device."""
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in checkpoint]
    if missing:
        raise LoadError(f"{path} lacks {', '.join(missing)}: not a checkpoint written by train.py")
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as error:
        raise LoadError(f"{path}: its model does not match model.py's GPT: {error}") from None
    return model.to(device).eval()


def load_trained(out_dir, ckpt, device):
    """(model, tokenizer, checkpoint) of out_dir's best.pt or ckpt.pt, or of hf:FOLDER."""
    if out_dir.startswith(HF_PREFIX):
        path = Path(out_dir.removeprefix(HF_PREFIX))
        checkpoint = read_hf_folder(path)
        return model_of(checkpoint, path, device), read_tokenizer_json(path), checkpoint
    path = Path(out_dir) / CHECKPOINT_FILES[ckpt]
    if not path.exists():  # a file, or a sharded checkpoint's folder
        raise LoadError(f"{path} not found: train.py writes ckpt.pt (--ckpt=latest) and "
                        f"best.pt (--ckpt=best) into its out_dir")
    checkpoint = load_checkpoint_file(path)
    model = model_of(checkpoint, path, device)
    try:
        tokenizer = load_tokenizer(out_dir, checkpoint["tokenizer"])
    except (OSError, ValueError, KeyError) as error:
        raise LoadError(f"{path}: cannot load its tokenizer: {error}") from None
    return model, tokenizer, checkpoint
