"""How many times a run reads its train split, and the defaults that follow from it.

    reads = epochs(max_iters, tokens_per_iter, train_tokens)   # 9.3: the run sees each token ~9 times
    dropout_for(reads)                                         # 0.2
    weight_decay_for(reads)                                    # 1.0

A run that reads its text less than once cannot memorise it: every batch is new, and dropout
only slows it down (the quick start reads 0.7 of data/python). A run that reads a small text
many times does memorise it: the train loss falls on while the val loss turns and rises.
Muennighoff et al. 2023 (Scaling Data-Constrained Language Models) found repeated tokens worth
almost as much as new ones for up to ~4 epochs, and less and less after; dropout is the
cheapest defence a small model has, a stronger weight decay the next (RESULTS.md: Own small
text). train.py sets the keys of DATA_DEFAULTS from the reads unless a config file or a flag
sets them; with max_time, once the timed iterations say how many iterations the run will have.
"""


def epochs(iterations, tokens_per_iter, train_tokens):
    """How many times `iterations` of `tokens_per_iter` read a train split of `train_tokens`."""
    return iterations * tokens_per_iter / max(train_tokens, 1)


def dropout_for(reads):
    """No dropout up to 4 reads, where repeats still teach almost as much as new text (a 1.66 MB
    text read ~3 times ended the same with 0.1 as with none); 0.2 past that, as nanoGPT's
    small-text example uses (a 0.42 MB text read 8-11 times: 1.61 bits per byte against 1.92)."""
    return 0.0 if reads <= 4 else 0.2


def weight_decay_for(reads):
    """train.py's default 0.1 up to 4 reads, 1.0 past that. Under the Muon recipe AdamW decays
    only the head: a 0.42 MB text read ~9 times ended at 1.57 bits per byte with 1.0 against
    1.63 with 0.1 (0.3: 1.60, 2.0: 1.63; decaying the blocks' matrices under Muon too: worse).
    Measured from scratch: the fine-tuning configs (chat_demo, finetune_files) set their own."""
    return 0.1 if reads <= 4 else 1.0


# the keys train.py sets from the reads unless the user does: key -> its value for so many reads
DATA_DEFAULTS = {"dropout": dropout_for, "weight_decay": weight_decay_for}


def reads_line(reads, train_tokens, iterations, tokens_per_iter, chosen):
    """The plan's line: the reads, and what they set (chosen: key -> value)."""
    settings = ", ".join(f"{key}={value:g}" for key, value in chosen.items())
    return (f"data: {iterations:,} iterations of {tokens_per_iter:,} tokens read the {train_tokens:,} train tokens "
            f"{reads:.2f} times" + (f": {settings} (set from the reads; a config file or flag overrides)"
                                    if chosen else ""))
