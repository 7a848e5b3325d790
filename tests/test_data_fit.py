"""What the data decides: prepare.py's vocabulary size from the size of the text, a run's
dropout from how many times it reads the train split (owngpt/epochs.py), and patience, which
ends a run whose val loss stopped improving."""
import random
import re
import string

import pytest
import torch

import train
from helpers import (GPT2_RECIPE, MODERN_RECIPE, SimulatedClock, eval_lines, make_text, run_prepare,
                     simulate_machine, stop_during_iteration, train_lines)
from owngpt import dataset, epochs
from owngpt.checkpoint import write_checkpoint
from owngpt.tokenizer import BYTES_PER_VOCAB_ENTRY, CHAT_TOKENS, vocab_size_for


# ----------------------------------------------------------------------------- the vocabulary
def test_the_vocabulary_grows_with_the_text_in_powers_of_two_up_to_the_default():
    per_entry = BYTES_PER_VOCAB_ENTRY
    assert vocab_size_for(0, 8192) == vocab_size_for(1000 * per_entry, 8192) == 512
    assert vocab_size_for(1024 * per_entry, 8192) == 1024
    assert vocab_size_for(2047 * per_entry, 8192) == 1024
    assert vocab_size_for(4096 * per_entry, 8192) == 4096
    assert vocab_size_for(10**9, 8192) == 8192  # data/python's 10.6 MB keeps the quick start's 8192


def random_words(size, seed):
    """About size bytes of words of random letters: a text whose BPE supports thousands of tokens."""
    rng = random.Random(seed)
    words, length = [], -1  # the first word has no space before it
    while length < size:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
        length += len(words[-1]) + 1
    return " ".join(words)


@pytest.mark.parametrize("size, vocab_size", [(300_000, 512), (450_000, 1024)])
def test_without_vocab_size_a_text_gets_one_token_per_400_bytes_and_the_report_says_why(size, vocab_size, tmp_path):
    # 300 kB / 400 = 750 tokens, the power of two below: 512; 450 kB / 400 = 1125: 1024. The BPE
    # trains on the first 100k characters, which support both; the rule counts the whole text
    (tmp_path / "notes.txt").write_text(random_words(size, seed=size), encoding="utf-8")
    run_prepare("--source=files", "--input=notes.txt", "--name=notes", "--tokenizer_train_chars=100000", cwd=tmp_path)
    folder = tmp_path / "data" / "notes"
    assert dataset.read_meta(folder)["tokenizer"]["vocab_size"] == vocab_size + len(CHAT_TOKENS)  # the chat tokens after it
    assert f"{vocab_size:,} tokens, not the default 8,192: without --vocab_size a text gets one per 400 bytes of " \
           f"train text (a power of two, at least 512), so that each token occurs often enough to be learned from " \
           f"({size / 1e6:.2f} MB here)" in (folder / "report.md").read_text().replace("\n", " ")


def test_a_text_too_small_for_its_share_gets_the_most_it_supports(tmp_path):
    (tmp_path / "note.txt").write_text(make_text(0), encoding="utf-8")  # 3 KB: fewer than 512 tokens occur twice
    run_prepare("--source=files", "--input=note.txt", "--name=note", cwd=tmp_path)
    vocab_size = dataset.read_meta(tmp_path / "data" / "note")["tokenizer"]["vocab_size"] - len(CHAT_TOKENS)
    report = (tmp_path / "data" / "note" / "report.md").read_text()
    assert vocab_size < 512 and f"This text supports {vocab_size:,} tokens" in report and "fewer than 512" in report


# ----------------------------------------------------------------------------- dropout
# the tiny dataset's train split holds ~13k tokens; the tiny model reads 256 per iteration
QUIET = ["--sample_every_eval=false"]


def saved(out_dir):
    return torch.load(out_dir / "ckpt.pt", weights_only=True)


def reads_said(stdout):
    [line] = re.findall(r"data: .* read the [\d,]+ train tokens ([\d.]+) times(.*)", stdout)
    return float(line[0]), line[1]


def test_the_dropout_and_weight_decay_rules_follow_the_reads():
    assert [epochs.dropout_for(reads) for reads in (0.5, 1.0, 2.5, 4.0, 4.1, 9.3)] == [0.0, 0.0, 0.0, 0.0, 0.2, 0.2]
    assert [epochs.weight_decay_for(reads) for reads in (0.5, 4.0, 4.1, 9.3)] == [0.1, 0.1, 1.0, 1.0]
    assert epochs.epochs(100, 256, 12_800) == 2.0


def decays(checkpoint):
    """The weight decay of each AdamW group the optimizer saved (Muon's in its own part)."""
    saved_optimizer = checkpoint["optimizer"]
    groups = saved_optimizer["adamw"]["param_groups"] if "adamw" in saved_optimizer else saved_optimizer["param_groups"]
    return sorted(group["weight_decay"] for group in groups)


@pytest.mark.parametrize("max_iters, dropout, weight_decay", [(20, 0.0, 0.1), (300, 0.2, 1.0)])
def test_dropout_and_weight_decay_are_set_from_the_reads_the_plan_states(max_iters, dropout, weight_decay, train_here,
                                                                         tiny_dataset, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 2)  # the choice is made before the first step
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", f"--max_iters={max_iters}",
                              *QUIET)
    assert finished.returncode == 0, finished.stderr
    reads, what = reads_said(finished.stdout)
    train_tokens = train.read_meta(tiny_dataset)["splits"]["train"]["tokens"]
    assert reads == pytest.approx(max_iters * 256 / train_tokens, rel=0.05)
    assert f"dropout={dropout:g}" in what and f"weight_decay={weight_decay:g}" in what
    checkpoint = saved(tmp_path)
    assert checkpoint["config"]["dropout"] == checkpoint["model_config"]["dropout"] == dropout
    assert checkpoint["fitted"]["dropout"] == dropout
    assert checkpoint["config"]["weight_decay"] == checkpoint["fitted"]["weight_decay"] == weight_decay
    assert decays(checkpoint)[-1] == weight_decay and decays(checkpoint)[0] == 0.0  # the matrices', not the vectors'


@pytest.mark.parametrize("where", ["flag", "config file"])
def test_data_defaults_the_user_sets_win_over_the_reads(where, train_here, tiny_dataset, tmp_path, monkeypatch):
    config = tmp_path / "mine.py"
    config.write_text("dropout = 0.0\nweight_decay = 0.1\n")
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 1)
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path / 'out'}", "--max_iters=300", *QUIET,
                              *(["--dropout=0.0", "--weight_decay=0.1"] if where == "flag" else [str(config)]))
    assert finished.returncode == 0, finished.stderr
    reads, what = reads_said(finished.stdout)
    assert reads > 4 and what == ""  # said, and nothing set from it
    checkpoint = saved(tmp_path / "out")
    assert checkpoint["config"]["dropout"] == 0.0 and checkpoint["config"]["weight_decay"] == 0.1
    assert not {"dropout", "weight_decay"} & set(checkpoint["fitted"]) and decays(checkpoint)[-1] == 0.1


def test_under_max_time_the_data_defaults_are_set_once_the_timed_iterations_fix_max_iters_and_resume_keeps_it(
        train_here, tiny_dataset, tmp_path, monkeypatch):
    """Stopped before the fit and after it, a run resumed twice takes the same steps as the
    whole run: the choice is made at the fit both times, and restored from the checkpoint."""
    flags = [f"--dataset={tiny_dataset}", *MODERN_RECIPE, "--max_time=30", "--eval_interval=20", *QUIET]
    clock = SimulatedClock()
    with monkeypatch.context() as patch:
        simulate_machine(patch, clock, lambda iteration: 0.1)
        stop_during_iteration(patch, 50)
        whole = train_here(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    assert "how many times the run reads them is known once iterations 6-30 are timed" in whole.stdout
    reads, what = reads_said(whole.stdout)
    assert reads > 4 and "dropout=0.2, weight_decay=1" in what  # 300 iterations fit in 30 s at 0.1 s each: ~6 reads
    assert saved(tmp_path / "whole")["model_config"]["dropout"] == 0.2
    for stop_at in (10, 40, 50):  # before the fit, after it, then on to where the whole run stopped
        with monkeypatch.context() as patch:
            simulate_machine(patch, clock, lambda iteration: 0.1)
            stop_during_iteration(patch, stop_at - trained(tmp_path / "halves"))
            resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}",
                                 *(["--init_from=resume"] if stop_at > 10 else []))
        assert resumed.returncode == 0, resumed.stderr
    losses = lambda out: [(line["iter"], line["loss"]) for line in train_lines(out)]
    assert losses(tmp_path / "halves") == losses(tmp_path / "whole")


def trained(out_dir):
    return saved(out_dir)["iter_num"] if (out_dir / "ckpt.pt").exists() else 0


def test_a_run_from_before_the_weight_decay_followed_the_reads_resumes_with_its_own(train_here, tiny_dataset,
                                                                                   tmp_path, monkeypatch):
    """Its checkpoint fitted dropout from the reads and kept the config's weight decay: resumed by
    this code, it goes on with that decay, not the one the reads would set now."""
    flags = [f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", "--max_iters=300", *QUIET]
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 2)
        assert train_here(*flags).returncode == 0
    checkpoint = saved(tmp_path)
    del checkpoint["fitted"]["weight_decay"]  # as the code before wrote it
    checkpoint["config"]["weight_decay"] = 0.1
    for group in checkpoint["optimizer"]["adamw"]["param_groups"]:
        group["weight_decay"] = min(group["weight_decay"], 0.1)
    write_checkpoint(tmp_path, checkpoint, keep_last=2, is_best=False)
    with monkeypatch.context() as patch:
        stop_during_iteration(patch, 2)
        resumed = train_here(*flags, "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    checkpoint = saved(tmp_path)
    assert checkpoint["iter_num"] > 2 and checkpoint["fitted"]["dropout"] == 0.2
    assert "weight_decay" not in checkpoint["fitted"] and decays(checkpoint)[-1] == 0.1


# ----------------------------------------------------------------------------- patience
def script_val_losses(patch, losses):
    """Each evaluation's val loss is the next of losses (the first: the one before training);
    train's is measured. run_evaluation evaluates val, then train."""
    real_evaluate, calls = train.evaluate, []

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        calls.append(None)
        return {**result, "loss": losses[(len(calls) - 1) // 2]} if len(calls) % 2 else result

    patch.setattr(train, "evaluate", evaluate)


# evaluations every 10 iterations: the best at iteration 20, none better after
PLATEAU = [9.0, 5.0, 4.0, *[4.5] * 200]


def test_under_cosine_patience_ends_the_run_after_that_many_evaluations_without_a_new_best(
        train_here, tiny_dataset, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        script_val_losses(patch, PLATEAU)
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *GPT2_RECIPE, "--max_iters=1000",
                              "--eval_interval=10", "--patience=3", *QUIET)
    assert finished.returncode == 0, finished.stderr
    assert "patience=3: no new best val loss in 3 evaluations: stopping at iteration 50" in finished.stdout
    assert "done: iteration 50 " in finished.stdout
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["iter_num"] == 20 and saved(tmp_path)["iter_num"] == 50


def test_under_wsd_patience_cools_down_first_then_stops_and_a_resumed_run_ends_where_it_would_have(
        train_here, tiny_dataset, tmp_path, monkeypatch):
    flags = [f"--dataset={tiny_dataset}", *MODERN_RECIPE, "--max_iters=1000", "--eval_interval=10", "--patience=3",
             "--cooldown_fraction=0.4", *QUIET]
    with monkeypatch.context() as patch:
        script_val_losses(patch, PLATEAU)
        whole = train_here(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    # out of patience at iteration 50, in the stable phase: a run planned to end at 50 / 0.6 = 83
    # would cool down from 50, and so does this one, whatever its evaluations say meanwhile
    assert "patience=3: no new best val loss in 3 evaluations: cooling down from iteration 50 to 83" in whole.stdout
    assert "done: iteration 83 " in whole.stdout
    rates = {line["iter"]: line["lr"] for line in train_lines(tmp_path / "whole")}
    assert rates[50] == rates[40] > rates[60] > rates[83] > 3e-4  # the peak, then down towards min_lr
    # stopped in the cooldown and resumed: the same steps, the same end
    with monkeypatch.context() as patch:
        script_val_losses(patch, PLATEAU)
        stop_during_iteration(patch, 65)
        assert train_here(*flags, f"--out_dir={tmp_path / 'halves'}").returncode == 0
    with monkeypatch.context() as patch:
        script_val_losses(patch, PLATEAU[7:])  # the evaluations after iteration 60
        resumed = train_here(*flags, f"--out_dir={tmp_path / 'halves'}", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "done: iteration 83 " in resumed.stdout
    losses = lambda out: [(line["iter"], line["loss"], line["lr"]) for line in train_lines(out)]
    assert losses(tmp_path / "halves") == losses(tmp_path / "whole")


def test_patience_zero_never_stops_a_run(train_here, tiny_dataset, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        script_val_losses(patch, PLATEAU)
        finished = train_here(f"--dataset={tiny_dataset}", f"--out_dir={tmp_path}", *GPT2_RECIPE, "--max_iters=80",
                              "--eval_interval=10", *QUIET)
    assert finished.returncode == 0 and "patience" not in finished.stdout and "done: iteration 80 " in finished.stdout
    assert eval_lines(tmp_path)[-1]["iter"] == 80
