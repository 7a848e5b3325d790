"""Deliberate breakages: change one line of behaviour in a copy of the project and see whether
the tests notice. A mutation the tests miss is a bug they would let through.

    python tests/mutations.py                      # every mutation, each against the fast subset
    python tests/mutations.py --only bpb_bytes,sample_latest
    python tests/mutations.py --select tests       # the whole suite, slow tests too
    python tests/mutations.py --only fsdp_resume_unsaved --select tests/test_fsdp.py

The project's tracked files (git ls-files: no data or out folders) are copied to a temporary
folder; the unchanged copy must pass first. Then each mutation replaces its snippet, which must
occur exactly once in its file (else it "does not apply": the code moved on, update the
snippet), the tests run there with -x (the first failure is enough), and the file is restored.
It prints a table: caught (and by which test), missed, or does not apply. Each run of the fast
subset takes about a minute on 2 cores; a breakage only slow tests can see (several processes)
needs --select. Not a test module: pytest collects test_*.py only.
"""
import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAST_SUBSET = "-m 'not slow' tests"
TIMEOUT_S = 1800  # a hung suite has noticed too; far above the whole suite's time on 2 busy cores


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    snippet: str  # exact source text, found exactly once in file
    replacement: str
    description: str


MUTATIONS = [
    # ---- the six of issue 32
    Mutation("bpb_bytes", "train.py",
             "totals[3] += byte_lengths[counted].sum().item()",
             "totals[3] += 1.2 * byte_lengths[counted].sum().item()",
             "evaluate counts 20% more bytes: every bits-per-byte figure 17% too low"),
    Mutation("eot_bytes", "owngpt/tokenizer.py",
             "0 if token in special else len(",
             "len(",
             "end-of-text counts its 13 bytes of <|endoftext|> in bits per byte"),
    Mutation("sample_latest", "owngpt/inference.py",
             'CHECKPOINT_FILES = {"best": "best.pt", "latest": "ckpt.pt"}',
             'CHECKPOINT_FILES = {"best": "best.pt", "latest": "best.pt"}',
             "sample.py --ckpt=latest reads best.pt"),
    Mutation("vocab_rule_bytes", "prepare.py",
             'vocab_size_for(tally.kept_bytes - tally.kept_val_bytes, settings["vocab_size"])',
             'vocab_size_for(0, settings["vocab_size"])',
             "the vocabulary rule is given 0 bytes instead of the train text's"),
    Mutation("curves_flat", "owngpt/curves.py",
             "return self.bottom - (value - low) / (high - low or 1) * (self.bottom - self.top)",
             "return self.bottom",
             "every curve is drawn as a flat line (y mapping constant)"),
    Mutation("fsdp_resume_unsaved", "train.py",
             "if (at_eval or stop) and bad_in_a_row == 0:",
             "if (at_eval or stop) and bad_in_a_row == 0 and not (cfg.init_from == 'resume' "
             "and cfg.parallelism == 'fsdp'):",
             "a resumed FSDP run saves no checkpoint (slow tests only: --select tests/test_fsdp.py)"),
    # ---- train.py
    Mutation("accuracy_of_inputs", "train.py",
             "totals[1] += (logits.argmax(dim=-1)[targets != -1] == counted).sum().item()",
             "totals[1] += (logits.argmax(dim=-1)[targets != -1] == inputs[targets != -1]).sum().item()",
             "next-token accuracy compares the predictions with the inputs, not the targets"),
    Mutation("micro_steps_summed", "train.py",
             "loss = loss / micro_steps",
             "loss = loss",
             "gradient accumulation sums the micro-steps' losses and gradients instead of averaging"),
    Mutation("tokens_per_s", "owngpt/runlog.py",
             "tokens_per_s = run.tokens_per_iter / (ms_per_iter / 1000)",
             "tokens_per_s = run.tokens_per_iter / ms_per_iter",
             "the logged speed is tokens per millisecond, labelled per second"),
    Mutation("loss_not_averaged_over_ranks", "train.py",
             "return loss_sum / run.runtime.world_size, grad_norm.item()",
             "return loss_sum, grad_norm.item()",
             "the logged loss is the sum over processes (slow tests only: --select tests/test_ddp.py)"),
    # ---- model.py
    Mutation("temperature_multiplies", "model.py",
             "logits = logits / temperature",
             "logits = logits * temperature",
             "sampling multiplies the logits by the temperature"),
    Mutation("top_p_drops_the_crossing_token", "model.py",
             "mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs",
             "mass_before = torch.cumsum(sorted_probs, dim=-1)",
             "nucleus sampling drops the token that reaches top_p"),
    Mutation("rotary_sign", "model.py",
             "first * sin + second * cos",
             "first * sin - second * cos",
             "rotary embedding: a sign in the rotation"),
    Mutation("residual_init_scale", "model.py",
             "std /= math.sqrt(2 * self.config.n_layer)",
             "std /= math.sqrt(self.config.n_layer)",
             "GPT-2 init: residual projections scaled by 1/sqrt(n_layer), not 1/sqrt(2 n_layer)"),
    # ---- owngpt/optimizers.py
    Mutation("cosine_sign", "owngpt/optimizers.py",
             "0.5 * (1 + math.cos(math.pi * progress))",
             "0.5 * (1 - math.cos(math.pi * progress))",
             "cosine schedule: a sign (the rate rises from min_lr to the peak)"),
    Mutation("warmup_starts_at_zero", "owngpt/optimizers.py",
             "return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)",
             "return cfg.learning_rate * iteration / (cfg.warmup_iters + 1)",
             "warmup: the first iteration's rate is 0 (a wasted step)"),
    Mutation("muon_momentum_warmup_sign", "owngpt/optimizers.py",
             "return 0.95 - 0.10 * max(0.0, 1 - iteration / 300)",
             "return 0.95 + 0.10 * max(0.0, 1 - iteration / 300)",
             "Muon's momentum warms down from 1.05 instead of up from 0.85"),
    Mutation("muon_tall_scale", "owngpt/optimizers.py",
             "scale = max(1.0, param.size(0) / param.size(1)) ** 0.5",
             "scale = min(1.0, param.size(0) / param.size(1)) ** 0.5",
             "Muon scales a wide matrix's update down instead of a tall one's up"),
    # ---- owngpt/dataset.py
    Mutation("last_window_lost", "owngpt/dataset.py",
             "max(0, len(tokens) - block_size) for tokens in shards",
             "max(0, len(tokens) - block_size - 1) for tokens in shards",
             "shard windows: off by one, the last window of every shard is never read"),
    Mutation("token_id_equal_to_vocab", "owngpt/dataset.py",
             "if len(tokens) and int(tokens.max()) >= vocab_size:",
             "if len(tokens) and int(tokens.max()) > vocab_size:",
             "shard check: off by one, a token id equal to vocab_size passes"),
    # ---- owngpt/checkpoint.py
    Mutation("rotation_keeps_one_more", "owngpt/checkpoint.py",
             "kept = (entries + [record])[-keep_last:]",
             "kept = (entries + [record])[-keep_last - 1:]",
             "checkpoint rotation keeps keep_last + 1 checkpoints"),
    Mutation("rotation_keeps_a_gone_back_record", "owngpt/checkpoint.py",
             'entries = [entry for entry in read_manifest(out_dir) if entry["iter"] < record["iter"]]',
             'entries = [entry for entry in read_manifest(out_dir) if entry["iter"] != record["iter"]]',
             "a resumed run keeps the records of the checkpoints past the one it went back to"),
    Mutation("every_save_is_best", "owngpt/checkpoint.py",
             "    if is_best:\n        link_as(path, out_dir / \"best.pt\")",
             "    link_as(path, out_dir / \"best.pt\")",
             "best.pt always points at the newest checkpoint"),
    Mutation("free_space_counts_one_less", "owngpt/checkpoint.py",
             "needed = (keep_last + 2) * checkpoint_bytes",
             "needed = (keep_last + 1) * checkpoint_bytes",
             "the free-space check forgets the checkpoint being written"),
    # ---- owngpt/tokenizer.py
    Mutation("bpe_merges_single_pairs", "owngpt/tokenizer.py",
             "        if count < 2:\n            break",
             "        if count < 1:\n            break",
             "BPE merges pairs that occur once"),
    # ---- owngpt/web/filters.py
    Mutation("dedup_key_not_normalised", "owngpt/web/filters.py",
             "data, size = normalise(text).encode(), 8",
             "data, size = text.encode(), 8",
             "the web dedup key: case and spacing make a different document"),
    Mutation("exact_dedup_normalised", "owngpt/web/filters.py",
             "return DedupSignature(exact_key(text, normalised=False), ())",
             "return DedupSignature(exact_key(text), ())",
             "the dedup key of code and books ignores case and spacing"),
    # ---- owngpt/curves.py, owngpt/runlog.py
    Mutation("best_ring_on_the_worst", "owngpt/curves.py",
             "best = min(val, key=lambda point: point[1]) if val else None",
             "best = max(val, key=lambda point: point[1]) if val else None",
             "the curves' ring marks the worst val loss"),
    Mutation("trim_drops_the_resumed_iteration", "owngpt/runlog.py",
             'if json.loads(line)["iter"] <= iteration:',
             'if json.loads(line)["iter"] < iteration:',
             "a resumed run drops the metrics of the iteration it resumes from"),
    # ---- prepare.py
    Mutation("split_bytes_in_characters", "prepare.py",
             'results.append((tokens, len(text.encode("utf-8", "surrogatepass"))))',
             "results.append((tokens, len(text)))",
             "a split's bytes are counted in characters (bits per byte wrong on non-ASCII text)"),
    Mutation("bytes_per_token_counts_eot", "prepare.py",
             'tokens = sum(split["tokens"] - split["documents"] for split in splits.values())  # no eot',
             'tokens = sum(split["tokens"] for split in splits.values())  # no eot',
             "meta.json's bytes_per_token counts the end-of-text tokens as text"),
    # ---- sample.py, export.py
    Mutation("sample_without_eot", "sample.py",
             "ids = [tokenizer.eot_token] + tokenizer.encode(prompt, allowed_special={EOT})",
             "ids = tokenizer.encode(prompt, allowed_special={EOT})",
             "a sample does not start after end-of-text, as every training document does"),
    Mutation("export_latest", "export.py",
             'CHECKPOINT_FILES = {"best": "best.pt", "latest": "ckpt.pt"}',
             'CHECKPOINT_FILES = {"best": "best.pt", "latest": "best.pt"}',
             "export.py --ckpt=latest exports best.pt"),
    Mutation("export_model_card_tokens", "export.py",
             'tokens_per_iter = config.get("batch_size", 0) * config.get("block_size", 0) * '
             'config.get("gradient_accumulation_steps", 0)',
             'tokens_per_iter = config.get("batch_size", 0) * config.get("block_size", 0)',
             "the model card's tokens seen forget gradient accumulation"),
    # ---- owngpt/ other modules
    Mutation("dropout_band", "owngpt/epochs.py",
             "return 0.0 if reads <= 4 else 0.2",
             "return 0.0 if reads < 4 else 0.2",
             "the dropout rule: 4 reads exactly already gets dropout"),
    Mutation("budget_ignores_evaluations", "owngpt/budget.py",
             "per_iter = self.seconds_per_iter + self.eval_seconds / cfg.eval_interval",
             "per_iter = self.seconds_per_iter",
             "max_time's fit leaves the evaluations' time out"),
    Mutation("tails_cut_not_at_line_start", "owngpt/filtered.py",
             "        if line_start > 0 and cut - line_start < len(text) - cut:\n            cut = line_start",
             "        if line_start > 0 and cut - line_start < len(text) - cut:\n            cut = line_start + 1",
             "val tails: the cut lands one character after the line start"),
    Mutation("hf_rotary_halves_kept", "owngpt/hf.py",
             "return heads.flip(1).reshape(weight.shape)",
             "return weight",
             "the modern block's export and import keep rotary's channel pairs as ours, not NanoChat's"),
    # ---- chat (owngpt/chat.py, the chat dataset's rows)
    Mutation("chat_trains_every_role", "owngpt/chat.py",
             'trained = int(message["role"] == "assistant")',
             "trained = 1",
             "the loss trains on the user's and the system's words too, not only the assistant's"),
    Mutation("chat_end_untrained", "owngpt/chat.py",
             "mask += [0] + [trained] * (len(content) + 1)",
             "mask += [0] + [trained] * len(content) + [0]",
             "the assistant's <|end|> is not trained: the model never learns to stop"),
    Mutation("chat_mask_one_off", "owngpt/dataset.py",
             "np.where(trained[:, 1:], rows[:, 1:], -1)",
             "np.where(trained[:, :-1], rows[:, 1:], -1)",
             "a chat row's targets are kept by the mask of the token before them"),
    Mutation("flag_suggestion_first_key", "owngpt/flags.py",
             "match = difflib.get_close_matches(key, known, n=1, cutoff=0.0)",
             "match = list(known)[:1]",
             "an unknown flag suggests the first key, not the closest"),
]


def tracked_copy(destination):
    """The repository's tracked files, as they are in the work tree, copied to destination."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, names.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a file deleted but not yet committed is listed too
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(copy, selection):
    """(passed, the first failing test's id or a note): the selected tests in copy, stopping at the first failure."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "worksteal", "-x", "-p", "no:cacheprovider",
               *shlex.split(selection)]
    # no .pyc files: a mutation that keeps a file's size within the same second would load a stale one
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = None
    finally:  # timed out, or this script was interrupted (Ctrl-C): its own session ends with it
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if output is None:
        return False, f"timed out after {TIMEOUT_S} s"
    if process.returncode == 0:
        return True, ""
    failed = [line.split()[1] for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return False, failed[0] if failed else output.strip().splitlines()[-1]


def try_mutation(mutation, copy, selection):
    """(result, detail) of one mutation: caught, missed or does not apply."""
    path = copy / mutation.file
    original = path.read_text(encoding="utf-8")
    found = original.count(mutation.snippet)
    if found != 1:
        return "does not apply", f"the snippet occurs {found} times in {mutation.file}"
    mutated = original.replace(mutation.snippet, mutation.replacement)
    compile(mutated, mutation.file, "exec")  # a mutation that breaks the syntax proves nothing
    path.write_text(mutated, encoding="utf-8")
    try:
        passed, detail = run_tests(copy, selection)
    finally:
        path.write_text(original, encoding="utf-8")
    return ("missed", "") if passed else ("caught", detail)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    parser.add_argument("--select", default=FAST_SUBSET, help="the tests to run, as pytest arguments (default: the "
                        "fast subset, %(default)s; tests: the whole suite)")
    args = parser.parse_args(argv)
    names = [name for name in args.only.split(",") if name]
    unknown = sorted(set(names) - {mutation.name for mutation in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation {', '.join(unknown)}; known: {', '.join(m.name for m in MUTATIONS)}")
    chosen = [mutation for mutation in MUTATIONS if not names or mutation.name in names]
    with tempfile.TemporaryDirectory(prefix="owngpt-mutations-") as folder:
        copy = Path(folder)
        tracked_copy(copy)
        passed, detail = run_tests(copy, args.select)
        if not passed:
            sys.exit(f"the unchanged project does not pass ({detail}): fix that first")
        results = []
        for mutation in chosen:
            result, detail = try_mutation(mutation, copy, args.select)
            results.append((mutation, result, detail))
            print(f"{mutation.name}: {result} {detail}".rstrip(), flush=True)
    width = max(len(mutation.name) for mutation in chosen)
    print(f"\n{'mutation':<{width}}  {'result':<14}  what it breaks / what caught it")
    for mutation, result, detail in results:
        print(f"{mutation.name:<{width}}  {result:<14}  {mutation.file}: {mutation.description}")
        if detail:
            print(f"{'':<{width}}  {'':<14}  {detail}")
    caught = sum(result == "caught" for _, result, _ in results)
    print(f"\n{caught} of {len(results)} caught by pytest {args.select}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
