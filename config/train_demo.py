"""The quick start: a small GPT on data/python, the standard library's own source code and
documentation (made by `python prepare.py`), for 4.5 minutes of a 2-core laptop CPU.

    python prepare.py                       # data/python: ~2.8M tokens, a BPE of 8192
    python train.py config/train_demo.py
    python sample.py --out_dir=out/demo --start="    def __init__(self"

The recipe is train.py's default, the one that measured best per minute of CPU (RESULTS.md:
Recipes at equal time): the modern block (rotary positions, RMSNorm, QK-norm, ReLU^2, an
untied head), Muon for the blocks' matrices with AdamW for the embedding and head, and a
warmup-stable-decay schedule. Without value embeddings, so that export.py can write the model
for transformers: with them it learns more in the same time (RESULTS.md: value embeddings
and the quick start), and `--value_embeddings=True` turns them on.
config/train_demo_gpt2.py, run after this file, is GPT-2's 2019 recipe at this shape.

What it gets through depends on the CPU's matrix multiplies and on what else the machine runs
(RESULTS.md: The quick start on both kinds of CPU): on 2 cores of an AMD Zen 4, 900-1,170
iterations in float32 (held to AVX2, or with AVX-512 on a busier or quieter day) and 1,200 with
the bfloat16 its AVX512_BF16 instructions multiply, which train.py times and takes; about 780
on an AVX2-only laptop-class machine. The val bits per byte fall from 3.6 (a uniform guess
among 8192 tokens) to 1.13-1.18; a Zen 5 core, where oneDNN multiplies twice as fast as MKL,
ran 1,700 iterations to 1.09. The samples turn into recognisable Python: imports, indented
methods, docstrings.
"""
out_dir = "out/demo"
dataset = "python"
# model: 4 blocks of width 128; 2.1M of its 2.88M parameters are the token embedding and the head,
# two tables of 8192 rows
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
# no dropout or weight_decay key: train.py sets them from how many times the run reads its data,
# 0 and 0.1 here (it reads 0.7 of data/python: nothing to overfit), 0.2 and 1.0 on a small text
# of your own that it reads 9 times
# batch: 16 x 128 = 2,048 tokens per iteration
batch_size = 16
# a time budget: max_iters is fitted to it once the first iterations are timed
max_time = 270.0
# learning rates tuned at this shape (RESULTS.md: The 300-iteration ablation): AdamW for the
# head at 4x GPT-2's recipe's 3e-3, for the token embedding at embedding_lr (it starts at unit
# scale), Muon at its usual 0.02 (the Muon post, nanochat); beta2 0.99 averages the noisy
# small-batch gradients longer
learning_rate = 1.2e-2
min_lr = 1.2e-3
embedding_lr = 0.3
muon_lr = 0.02
warmup_iters = 30
beta1 = 0.8  # a shorter momentum (modded-nanogpt's Adam betas; RESULTS.md: beta1 0.8)
beta2 = 0.99
eval_interval = 100
eval_iters = 5  # 5 batches per split: a steady curve for a few % of the run's time
log_interval = 50
