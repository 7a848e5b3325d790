"""The quick start's shape with GPT-2's 2019 recipe: learned positions, LayerNorm, GELU, a
tied head, AdamW and a cosine schedule. The baseline config/train_demo.py is measured
against (bench.py's gpt2 recipe), and the block export.py can write for transformers.

    python train.py config/train_demo_gpt2.py
    python export.py --out_dir=out/demo_gpt2 --dest=hf/demo

Its learning rate is tuned at this shape: 3e-3 beat 6e-3 at every evaluation of a 600-step run.
"""
out_dir = "out/demo_gpt2"
dataset = "python"
block = "gpt2"
optimizer = "adamw"
lr_schedule = "cosine"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
batch_size = 16
max_time = 270.0  # seconds, like the quick start
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 30
beta1 = 0.8  # a shorter momentum (modded-nanogpt's Adam betas): 1% lower val loss for both recipes here
beta2 = 0.99
eval_interval = 100
eval_iters = 5
log_interval = 50
