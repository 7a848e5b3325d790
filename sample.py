"""Generate text from a model trained by train.py, printing each token as it is made.

    python sample.py --out_dir=out/demo
    python sample.py --out_dir=out/demo --start="def fibonacci(n):" --num_samples=3
    python sample.py --out_dir=out/demo --start=FILE:prompt.txt --temperature=0.6 --top_p=0.9

It needs only the out folder: the checkpoint describes its tokenizer, and train.py copies
a trained BPE's file next to it. A sample starts after an end-of-text token, as every
training document does, then the prompt; it ends at the next end-of-text or after
max_new_tokens. Samples go to stdout, separated by a line of dashes; the speed goes to
stderr. Flags are --key=value, checked like train.py's; `python sample.py --help` lists them.
"""
import ast
import codecs
import difflib
import re
import sys
import time
from pathlib import Path

import torch

from model import GPT, GPTConfig, check_sampling_options
from dataset import EOT
from tokenizer import load_tokenizer
from checkpoint import load_checkpoint_file
from flags import UserError
from train import pick_device

_NAMES_BEFORE_DEFAULTS = set(globals())
# ----------------------------------------------------------------------------- defaults
out_dir = "out"  # the folder train.py wrote
ckpt = "best"  # best (best.pt, the lowest val loss) or latest (ckpt.pt)
start = ""  # the prompt: text, or FILE:path of a UTF-8 file; empty starts a fresh document
num_samples = 1  # samples to draw, one after another
max_new_tokens = 500  # tokens per sample at most (fewer when end-of-text comes first)
temperature = 0.8  # 0 is greedy; below 1 sharper, above 1 more random
top_k = 200  # draw only from the k likeliest tokens; 0 for all
top_p = 1.0  # draw only from the smallest set of tokens whose probability reaches p; 1.0 for all
seed = 1337  # the same checkpoint, flags and seed give the same samples
device = "auto"  # auto (cuda, then mps, then cpu), or a torch device: cpu, cuda, cuda:1, mps
kv_cache = True  # False recomputes the whole context for every token (slower; for comparison)
# -----------------------------------------------------------------------------
DEFAULTS = {name: value for name, value in globals().items()
            if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
CHECKPOINT_FILES = {"best": "best.pt", "latest": "ckpt.pt"}
SEPARATOR = "-" * 40


class SampleError(Exception):
    """A problem the user can fix (a flag, a file): printed without a traceback."""


def parse_flags(argv):
    """The defaults updated by each --key=value, checked against the default's type."""
    flags = dict(DEFAULTS)
    for arg in argv:
        key, has_value, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not has_value:
            raise SampleError(f"{arg!r}: flags are written --key=value (see --help)")
        if key not in DEFAULTS:
            closest = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.0)[0]
            raise SampleError(f"unknown flag --{key}; did you mean --{closest}?")
        flags[key] = flag_value(key, text)
    if flags["ckpt"] not in CHECKPOINT_FILES:
        raise SampleError(f"--ckpt={flags['ckpt']}: expected best or latest")
    for key in ("num_samples", "max_new_tokens"):
        if flags[key] < 1:
            raise SampleError(f"--{key}={flags[key]}: expected at least 1")
    try:
        check_sampling_options(flags["temperature"], flags["top_k"] or None, flags["top_p"])
    except ValueError as error:
        raise SampleError(f"{error} (--top_k=0 means no top-k limit)") from None
    return flags


def flag_value(key, text):
    """The flag's text as the type of its default: strings as written, the rest as Python
    literals (3, 0.9, 1e-3, False); an int is fine where a float is expected."""
    expected = type(DEFAULTS[key])
    if expected is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:
        raise SampleError(f"--{key}={text}: expected {expected.__name__}, like the default {DEFAULTS[key]!r}")
    return value


def help_text():
    """Every flag with its default and the comment beside it in this file."""
    comments = dict(re.findall(r"^(\w+) = .*?  # (.*)$", Path(__file__).read_text(), re.MULTILINE))
    width = max(len(f"--{key}={value!r}") for key, value in DEFAULTS.items())
    lines = ["usage: python sample.py [--key=value ...]", "", "Flags and defaults:"]
    lines += [f"  {f'--{key}={value!r}':<{width}}  {comments[key]}" for key, value in DEFAULTS.items()]
    return "\n".join(lines)


def read_prompt(start):
    """The prompt text: `start` itself, or the contents of the UTF-8 file after FILE:."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start.removeprefix("FILE:"))
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:
        raise SampleError(f"--start={start}: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise SampleError(f"--start={start}: {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                          f"at offset {error.start}); save it as UTF-8") from None


def load_model(path, device):
    """The GPT stored in the checkpoint at path, in eval mode, and the checkpoint."""
    if not path.is_file():
        raise SampleError(f"{path} not found: train.py writes ckpt.pt (--ckpt=latest) and "
                          f"best.pt (--ckpt=best) into its out_dir")
    try:
        checkpoint = load_checkpoint_file(path)
    except UserError as error:
        raise SampleError(str(error)) from None
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in checkpoint]
    if missing:
        raise SampleError(f"{path} lacks {', '.join(missing)}: not a checkpoint written by train.py")
    try:
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, RuntimeError) as error:
        raise SampleError(f"{path}: its model does not match model.py's GPT: {error}") from None
    return model.to(device).eval(), checkpoint


def print_sample(model, tokenizer, prompt, flags, generator):
    """Stream one sample to stdout; return the number of tokens generated.

    Tokens are byte strings, and one character of UTF-8 may be split across several of
    them: an incremental decoder prints each character once all its bytes have come."""
    ids = [tokenizer.eot_token] + tokenizer.encode(prompt, allowed_special={EOT})
    idx = torch.tensor([ids], dtype=torch.long, device=flags["device"])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    steps = model.generate(idx, flags["max_new_tokens"], temperature=flags["temperature"],
                           top_k=flags["top_k"] or None, top_p=flags["top_p"], generator=generator,
                           stop_token=tokenizer.eot_token, use_cache=flags["kv_cache"])
    generated = 0
    for token in steps:
        generated += 1
        if int(token) == tokenizer.eot_token:
            break
        sys.stdout.write(decoder.decode(tokenizer.decode_single_token_bytes(int(token))))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode(b"", final=True) + "\n" + SEPARATOR + "\n")
    sys.stdout.flush()
    return generated


def sample(flags):
    flags["device"] = pick_device(flags["device"])
    prompt = read_prompt(flags["start"])
    path = Path(flags["out_dir"]) / CHECKPOINT_FILES[flags["ckpt"]]
    model, checkpoint = load_model(path, flags["device"])
    try:
        tokenizer = load_tokenizer(flags["out_dir"], checkpoint["tokenizer"])
    except (OSError, ValueError, KeyError) as error:
        raise SampleError(f"{path}: cannot load its tokenizer: {error}") from None
    generator = torch.Generator(device=flags["device"]).manual_seed(flags["seed"])
    generated, started = 0, time.perf_counter()
    for _ in range(flags["num_samples"]):
        generated += print_sample(model, tokenizer, prompt, flags, generator)
    seconds = time.perf_counter() - started
    print(f"{generated} tokens in {seconds:.2f} s: {generated / seconds:,.1f} tokens/s "
          f"(KV cache {'on' if flags['kv_cache'] else 'off'}, {flags['device']})", file=sys.stderr)


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    try:
        flags = parse_flags(argv)
        sample(flags)
    except SampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
