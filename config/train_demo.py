"""The quick start: a small GPT on data/python, the standard library's own source code and
documentation (made by `python prepare.py`), in about 5 minutes on a 2-core laptop CPU.

    python prepare.py                       # data/python: ~2.8M tokens, a BPE of 8192
    python train.py config/train_demo.py
    python sample.py --out_dir=out/demo --start="    def __init__(self"

Measured on a quiet 2-core CPU: 4m35s in all, ~500 ms per iteration (4,000 tokens/s), the
val loss falling at every evaluation from 9.0 (ln 8192: a uniform guess) to 3.95 at
iteration 500: 1.58 bits per byte, 34% of next tokens right, 1M tokens seen. The samples are recognisably Python:
imports, indented methods, docstrings and comments, and the standard library's many codec
tables (encodings/*.py), the most regular text in it, which a model this small learns first.
"""
out_dir = "out/demo"
dataset = "python"
# model: 4 blocks of width 128; over half of its 1.85M parameters are the token embedding
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0  # the run reads less than half of the data, once: nothing to overfit
# batch: 16 x 128 = 2,048 tokens per iteration, 1M in the run: 0.55 tokens per parameter, far
# short of Chinchilla's 20, as 5 minutes of CPU must be
batch_size = 16
max_iters = 500
# a small model takes a high learning rate; beta2 0.99 averages the noisy small-batch gradients longer
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
beta2 = 0.99
eval_interval = 100
eval_iters = 5  # 5 batches per split: a steady curve for ~4% of the run's time
log_interval = 50
