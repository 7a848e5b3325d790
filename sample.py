"""Generate text from a model trained by train.py, printing each token as it is made.

    python sample.py --out_dir=out/demo
    python sample.py --out_dir=out/demo --start="def fibonacci(n):" --num_samples=3
    python sample.py --out_dir=out/demo --start=FILE:prompt.txt --temperature=0.6 --top_p=0.9
    python sample.py --out_dir=hf:hf/demo   # a Hugging Face folder: export.py's, or GPT-2's own

It needs only the out folder: the checkpoint describes its tokenizer, and train.py copies
a trained BPE's file next to it. A sample starts after an end-of-text token, as every
training document does, then the prompt; it ends at the next end-of-text or after
max_new_tokens. Samples go to stdout, separated by a line of dashes; the speed goes to
stderr. Flags are --key=value, checked like train.py's; `python sample.py --help` lists them.
"""
import codecs
import sys
import time
from pathlib import Path

import torch

from owngpt import flags
from owngpt.dataset import EOT
from owngpt.inference import SAMPLING_CHECKS, load_trained
from owngpt.runtime import pick_device

_NAMES_BEFORE_DEFAULTS = set(globals())
# ----------------------------------------------------------------------------- defaults
out_dir = "out"  # the folder train.py wrote, or hf:FOLDER, a Hugging Face GPT-2 or NanoChat folder (ckpt is then unused)
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
HELP = flags.comments_of(__file__)
# Every key but out_dir and start (free-form: a missing checkpoint or prompt file is named
# when it is read) and kv_cache (a boolean) is checked before the model is loaded.
CHECKS = {**SAMPLING_CHECKS, "num_samples": flags.at_least(1)}
SEPARATOR = "-" * 40


class SampleError(flags.UserError):
    """A problem the user can fix (a flag, a file): printed without a traceback."""


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


def print_sample(model, tokenizer, prompt, settings, generator):
    """Stream one sample to stdout; return the number of tokens generated.

    Tokens are byte strings, and one character of UTF-8 may be split across several of
    them: an incremental decoder prints each character once all its bytes have come."""
    ids = [tokenizer.eot_token] + tokenizer.encode(prompt, allowed_special={EOT})
    idx = torch.tensor([ids], dtype=torch.long, device=settings["device"])
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(prompt)
    steps = model.generate(idx, settings["max_new_tokens"], temperature=settings["temperature"],
                           top_k=settings["top_k"] or None, top_p=settings["top_p"], generator=generator,
                           stop_token=tokenizer.eot_token, use_cache=settings["kv_cache"])
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


def sample(settings):
    settings["device"] = pick_device(settings["device"])
    prompt = read_prompt(settings["start"])
    model, tokenizer, _ = load_trained(settings["out_dir"], settings["ckpt"], settings["device"])
    generator = torch.Generator(device=settings["device"]).manual_seed(settings["seed"])
    generated, started = 0, time.perf_counter()
    for _ in range(settings["num_samples"]):
        generated += print_sample(model, tokenizer, prompt, settings, generator)
    seconds = time.perf_counter() - started
    print(f"{generated} tokens in {seconds:.2f} s: {generated / seconds:,.1f} tokens/s "
          f"(KV cache {'on' if settings['kv_cache'] else 'off'}, {settings['device']})", file=sys.stderr)


def main(argv):
    return flags.run_script(sample, argv, DEFAULTS, HELP, CHECKS, program="sample.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
