"""GPT-2's own 2019 recipe at its size, to compare with the modern one at equal tokens; run it
after config/train_gpt2_124m.py, whose shape, batch and horizon it keeps:

    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py config/train_gpt2_124m_2019.py

GPT-2's block (learned positions, LayerNorm, GELU, a tied head), AdamW and a cosine schedule
with GPT-3 small's rates (Brown et al. 2020, table 2.1). It exports as GPT2LMHeadModel, and it
is the shape init_from=hf: reads OpenAI's GPT-2 small into (with --bias=True).
"""
out_dir = "out/gpt2_124m_2019"
block = "gpt2"
n_head = 12
optimizer = "adamw"
lr_schedule = "cosine"
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
warmup_iters = 700
