"""The quick start at 4.5x its compute per token (53M training FLOPs per token against 11.8M):
8 blocks of width 256, run after it, for a machine with more to give or a longer wait.

    python train.py config/train_demo.py config/train_demo_8x256.py

The same data, batch, rates and time budget; bench.py uses it to check that the recipe that won
at the quick start's shape still wins at a larger one (RESULTS.md: The recipes at 4.5x the
compute per token).
"""
out_dir = "out/demo_8x256"
n_layer = 8
n_head = 4  # heads of 64, GPT-2's head size (the quick start's 4 heads are 32 wide)
n_embd = 256
