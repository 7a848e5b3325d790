"""Fine-tune the quick start's model into an assistant: 2 minutes of a 2-core CPU on
conversations about the standard library (owngpt/stdlib_chat.py), the loss on the answers only.

    python prepare.py --source=stdlib_chat --tokenizer=data/python    # data/stdlib_chat, the model's tokenizer
    python train.py config/chat_demo.py --init_from=out/demo/best.pt
    python chat.py --out_dir=out/chat --prompt="What does json.dumps do?"

It runs config/train_demo.py first, so the model's shape and recipe are the quick start's (a
checkpoint is only loaded into the shape it was trained at), then changes what fine-tuning
changes: the data, the time, and gentler rates that keep what pretraining learned.
"""
from pathlib import Path

exec((Path(__file__).parent / "train_demo.py").read_text())
out_dir = "out/chat"
dataset = "stdlib_chat"
max_time = 120.0
learning_rate = 3e-3
min_lr = 3e-4
embedding_lr = 0.05
muon_lr = 0.01
warmup_iters = 10
weight_decay = 0.1  # not the 1.0 train.py sets past 4 reads, measured from scratch: here it would pull the trained head to zero
eval_interval = 50
