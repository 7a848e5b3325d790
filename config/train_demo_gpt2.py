"""GPT-2's 2019 recipe at the quick start's shape: learned positions, LayerNorm, GELU, a tied
head, AdamW and a cosine schedule. It holds only what differs from config/train_demo.py, so
run it after that file (config files run in order, each over the settings before it):

    python train.py config/train_demo.py config/train_demo_gpt2.py
    python export.py --out_dir=out/demo_gpt2 --dest=hf/demo

The baseline the quick start's recipe is measured against (bench.py's gpt2 recipe reads its
flags from this file), and the block export.py can write for transformers.
"""
out_dir = "out/demo_gpt2"
block = "gpt2"
value_embeddings = False  # part of the modern block
optimizer = "adamw"
lr_schedule = "cosine"
learning_rate = 3e-3  # tuned at this shape: lower val loss than 6e-3 (RESULTS.md: GPT-2's recipe's learning rate)
min_lr = 3e-4
