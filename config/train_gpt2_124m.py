"""GPT-2 small (124M parameters) on web text, 8 GPUs on one machine.

    python prepare.py --source=commoncrawl --tokenizer=gpt2 --name=webtext   # see prepare.py --help
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py

Each iteration is 16 sequences x 1024 tokens x 32 micro-steps (4 per GPU) = 524,288 tokens,
GPT-3 small's batch. 19,073 iterations = 10B tokens, ~80 tokens per parameter: past
Chinchilla's ~20, as small models that will be used a lot are trained today.

What to expect (estimated, not measured here; `python plan.py config/train_gpt2_124m.py
--vocab_size=50257` for every card, its memory and an example cost): ~0.85 GFLOPs per token, so
at 40% of an H100's 989 TFLOP/s each GPU runs ~463K tokens/s, and 8 H100s take ~0.14 s per
iteration and ~45 minutes for the run, evaluations included; A100s (312 TFLOP/s) about three
times longer. The log line's MFU says how close a run gets. bfloat16 and TF32 are on by default on these cards. Val loss
should fall to about 3.3 (GPT-2 small's own loss on web text is about 3.3).
One GPU works too (torchrun --nproc_per_node=1, or plain python): 8x the time per iteration.
"""
out_dir = "out/gpt2_124m"
dataset = "webtext"
# model: GPT-2 small's shape and block (without biases: a little faster, no worse); the gpt2
# block is the one export.py writes for transformers and init_from=hf: reads
block = "gpt2"
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
dropout = 0.0
# batch: 16 x 1024 x 32 = 524,288 tokens per iteration, whatever the number of GPUs
batch_size = 16
gradient_accumulation_steps = 4 * 8
# optimizer and schedule: GPT-3 small's (Brown et al. 2020, table 2.1)
optimizer = "adamw"
lr_schedule = "cosine"
max_iters = 19073
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
weight_decay = 0.1
beta2 = 0.95
# evaluation: 80 batches of 16 x 1024 tokens (1.3M tokens), shared by the 8 GPUs
eval_interval = 500
eval_iters = 80
log_interval = 10
compile = True
