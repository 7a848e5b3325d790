"""The quick start: a small GPT on data/python, the standard library's own source code and
documentation (made by `python prepare.py`), for 4.5 minutes of a 2-core laptop CPU.

    python prepare.py                       # data/python: ~2.8M tokens, a BPE of 8192
    python train.py config/train_demo.py
    python sample.py --out_dir=out/demo --start="    def __init__(self"

The recipe is train.py's default with value embeddings, the one that measured best per
minute of CPU (bench.py, README: Results): the modern block (rotary positions, RMSNorm,
QK-norm, ReLU^2, an untied head, a value embedding per layer), Muon for the blocks' matrices
with AdamW for the embeddings and head, and a warmup-stable-decay schedule.
config/train_demo_gpt2.py is GPT-2's 2019 recipe at this shape.

Measured on a quiet 2-core CPU (2026-11-29, `python bench.py --what=recipes --budget=270`,
medians of two seeds): about 1,120 iterations (~8,200 tokens/s, 2.3M tokens), the val loss
falling from 9.0 (ln 8192: a uniform guess) to 2.66: 1.086 bits per byte, 53% of next tokens
right, against 1.279 bits per byte for GPT-2's recipe in the same time (0.849x). The samples
are recognisably Python: imports, indented methods, docstrings, and the standard library's
codec tables (encodings/*.py), the most regular text in it, which a model this small learns
first.
"""
out_dir = "out/demo"
dataset = "python"
# model: 4 blocks of width 128; 6.3M of its 7.1M parameters are the tables of 8192 rows: the token
# embedding, the head and the value embeddings
n_layer = 4
n_head = 4
n_embd = 128
value_embeddings = True  # 4 more tables of 8192 x 128: looked up, not multiplied (README: Results)
block_size = 128
dropout = 0.0  # the run reads less than the data once: nothing to overfit
# batch: 16 x 128 = 2,048 tokens per iteration
batch_size = 16
# a time budget: max_iters is fitted to it once the first iterations are timed
max_time = 270.0
# learning rates tuned at this shape (README: Results): AdamW for the head at 4x GPT-2's recipe's
# 3e-3, for the token embedding at embedding_lr (it starts at unit scale), Muon at its usual
# 0.02 (the Muon post, nanochat: 0.01-0.03 measured alike here); beta2 0.99 averages the noisy
# small-batch gradients longer
learning_rate = 1.2e-2
min_lr = 1.2e-3
embedding_lr = 0.3
muon_lr = 0.02
warmup_iters = 30
beta1 = 0.8  # a shorter momentum (modded-nanogpt's Adam betas): 1% lower val loss for both recipes here
beta2 = 0.99
eval_interval = 100
eval_iters = 5  # 5 batches per split: a steady curve for a few % of the run's time
log_interval = 50
