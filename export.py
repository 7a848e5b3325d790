"""Export a model trained by train.py to the Hugging Face format, to use it with transformers.

    python export.py --out_dir=out/demo --dest=hf/demo
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf/demo')('def f(x):'))"

dest gets what AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained read,
without trust_remote_code: config.json (GPT2LMHeadModel for the gpt2 block, NanoChatForCausalLM
for the modern one), model.safetensors, generation_config.json, tokenizer.json and
tokenizer_config.json (our tokenizer as a fast tokenizer; for a model fine-tuned on
conversations, with the chat template, so that apply_chat_template and generate talk to it as
chat.py does) and README.md, a model card with what the checkpoint records. owngpt/hf.py
writes them. Each computes exactly what our model does; a model with value embeddings, which
no transformers architecture has, is refused rather than exported as something that computes
otherwise.
Flags are --key=value, checked like sample.py's; `python export.py --help` lists them.
"""
import json
import math
import sys
import time
from pathlib import Path

from model import GPT, GPTConfig
from owngpt import flags
from owngpt.checkpoint import load_checkpoint_file
from owngpt.dataset import DatasetError, open_folder, read_meta
from owngpt.hf import write_hf_folder
from owngpt.tokenizer import load_tokenizer

_NAMES_BEFORE_DEFAULTS = set(globals())
# ----------------------------------------------------------------------------- defaults
out_dir = "out"  # the folder train.py wrote
ckpt = "best"  # best (best.pt, the lowest val loss) or latest (ckpt.pt)
dest = ""  # the folder to write; empty: hf/<name of out_dir>
# -----------------------------------------------------------------------------
DEFAULTS = {name: value for name, value in globals().items()
            if name not in _NAMES_BEFORE_DEFAULTS and not name.startswith("_")}
HELP = flags.comments_of(__file__)
CHECKPOINT_FILES = {"best": "best.pt", "latest": "ckpt.pt"}
CHECKS = {"ckpt": flags.one_of(*CHECKPOINT_FILES)}  # out_dir and dest are named when opened


class ExportError(flags.UserError):
    """A checkpoint that cannot be exported: one line, no traceback."""


def eval_record(out_dir, iteration):
    """metrics.jsonl's evaluation at this iteration, or None."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return next((record for record in reversed(records)
                 if record.get("iter") == iteration and "val_loss" in record), None)


def dataset_summary(name):
    """Lines about the dataset from its meta.json, when its folder is reachable from here."""
    try:
        folder = open_folder(name)
        meta = read_meta(folder)
    except (DatasetError, OSError, ValueError):
        return [f"- dataset: {name} (its folder is not reachable from where this was exported)"]
    tokenizer = meta["tokenizer"]
    made = [f"- dataset: {name}, made by prepare.py from {', '.join(json.dumps(source) for source in meta['sources'])}"]
    described = (f"- tokenizer: {tokenizer['kind']}, {tokenizer['vocab_size']:,} tokens, "
                 f"end-of-text id {tokenizer['eot_id']}")
    if "chat" in meta:  # conversations: no documents kept or dropped, each turn counted
        return [*made, "- conversations: " + ", ".join(
            f"{split} {summary['conversations']:,} ({summary['turns']:,} assistant turns, "
            f"{summary['trained_tokens']:,} of {summary['tokens']:,} tokens trained)"
            for split, summary in meta["splits"].items()), described]
    splits = ", ".join(f"{split} {summary['tokens']:,} tokens ({summary['documents']:,} documents)"
                       for split, summary in meta["splits"].items())
    return [*made,
            f"- documents kept: {meta['documents']['kept']:,} of {meta['documents']['read']:,} read "
            f"(dropped: {', '.join(f'{reason} {count:,}' for reason, count in meta['dropped'].items()) or 'none'})",
            f"- splits: {splits}", described,
            "- the dataset folder's report.md tells what each filter dropped and why"]


ARCHITECTURES = {
    "gpt2": "It is a GPT2LMHeadModel with the exact GELU (`activation_function: gelu`).",
    "modern": "It is a NanoChatForCausalLM (transformers 5.0 or later): rotary positions, QK-norm, "
              "ReLU^2 MLPs, RMSNorm without gains, an untied head, no logit softcap.",
}


# How to use the model, in the model card: a base model continues text, a chat model answers
USAGE = {
    False: ['# training documents start with <|endoftext|>, so prompts do too',
            'ids = tokenizer("<|endoftext|>def f(x):", return_tensors="pt").input_ids',
            "print(tokenizer.decode(model.generate(ids, max_new_tokens=50, do_sample=True)[0]))", "```", "",
            "The tokenizer reads the literal text `<|endoftext|>` as the end-of-text token; owngpt's "
            "tokenizer reads text as plain text (prepare.py encodes documents with disallowed_special=())."],
    True: ['messages = [{"role": "user", "content": "Hello! What can you tell me?"}]',
           'ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",',
           '                                    return_dict=True).input_ids',
           "answer = model.generate(ids, max_new_tokens=200)[0, ids.shape[1]:]  # greedy; it ends at <|end|>",
           "print(tokenizer.decode(answer, skip_special_tokens=True))", "```", "",
           "Fine-tuned on conversations: the chat template (tokenizer_config.json) gives the ids owngpt's "
           "chat.py feeds the model, a message's text read as plain text (`<|end|>` in it too), and "
           "generation_config.json ends an answer at `<|end|>`, as chat.py does. Outside a chat template, the "
           "tokenizer reads the literal text of a special token (`<|endoftext|>`, `<|end|>`...) as that token."],
}


def model_card(checkpoint, out_dir, path, dest):
    """README.md: what the model is, how to load it, and what its checkpoint records."""
    config, model_config = checkpoint.get("config", {}), checkpoint["model_config"]
    iteration, chat = checkpoint.get("iter_num", 0), bool(checkpoint.get("chat"))
    evaluation = eval_record(out_dir, iteration) or {}
    tokens_per_iter = config.get("batch_size", 0) * config.get("block_size", 0) * config.get("gradient_accumulation_steps", 0)
    val_loss = evaluation.get("val_loss", checkpoint.get("best_val_loss"))
    counted = "the assistant's answers in val conversations" if chat else "val text"
    with_eval = [f"- val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 700)):.2f})"
                 + (f" on {counted}" if chat else "")] if val_loss else []
    if "val_bpb" in evaluation:
        with_eval.append(f"- {evaluation['val_bpb']:.3f} bits per byte of {counted}")
    parameters = GPT(GPTConfig(**model_config)).num_params()
    return "\n".join([
        f"# {Path(dest).name}", "",
        f"A small GPT trained from scratch with owngpt (train.py){', fine-tuned on conversations,' if chat else ''} "
        f"and exported by export.py from `{path}`. {ARCHITECTURES[model_config['block']]}", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{dest}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{dest}")', *USAGE[chat], "",
        "## Training", "", *dataset_summary(config.get("dataset", "?")),
        f"- iterations: {iteration:,}; tokens seen: {evaluation.get('tokens', iteration * tokens_per_iter):,}",
        *with_eval, "",
        "## Architecture", "",
        f"- {parameters:,} parameters: {model_config['n_layer']} layers, {model_config['n_head']} heads, "
        f"width {model_config['n_embd']}, context {model_config['block_size']} tokens, "
        f"vocabulary {model_config['vocab_size']:,}",
        f"- biases: {'yes' if model_config.get('bias') else 'none in training (exported as zeros)'}; "
        f"dropout {model_config.get('dropout', 0.0)}", ""])


def export(settings):
    out_dir = Path(settings["out_dir"])
    path = out_dir / CHECKPOINT_FILES[settings["ckpt"]]
    if not path.exists():  # a file, or a sharded checkpoint's folder
        raise ExportError(f"{path} not found: train.py writes ckpt.pt (--ckpt=latest) and best.pt "
                          "(--ckpt=best) into its out_dir")
    dest = Path(settings["dest"] or Path("hf") / out_dir.resolve().name)
    started = time.perf_counter()
    checkpoint = load_checkpoint_file(path)
    missing = [key for key in ("model", "model_config", "tokenizer") if key not in checkpoint]
    if missing:
        raise ExportError(f"{path} lacks {', '.join(missing)}: not a checkpoint written by train.py")
    encoder = load_tokenizer(out_dir, checkpoint["tokenizer"])
    written = write_hf_folder(dest, checkpoint, encoder, model_card(checkpoint, out_dir, path, dest))
    size = sum(file.stat().st_size for file in written)
    print(f"wrote {dest} ({len(written)} files, {size / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s")
    return dest


def main(argv):
    return flags.run_script(export, argv, DEFAULTS, HELP, CHECKS, program="export.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
