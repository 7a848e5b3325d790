"""GPT-2 small's shape (12 layers of 768) on web text with the modern recipe, 8 GPUs on one machine.

    python prepare.py --source=commoncrawl --tokenizer=gpt2 --name=webtext   # see prepare.py --help
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m.py
    python export.py --out_dir=out/gpt2_124m --dest=hf/gpt2_124m            # a NanoChatForCausalLM

The recipe is the one nanochat trains its d12 model (this size) with, rates included
(karpathy/nanochat, scripts/base_train.py and nanochat/gpt.py): the modern block, Muon at 0.02
for the blocks' matrices, AdamW for the head at 0.008 and for the token embedding at 0.3,
betas (0.8, 0.95), no weight decay on them, 40 warmup iterations, a warmup-stable-decay
schedule whose last 65% decays linearly to 5% of the peak. modded-nanogpt's GPT-2-small speed
records use the same pieces (Adam betas (0.8, 0.95), head 0.008, a Muon for the matrices).
Its head is untied: 162M parameters, where GPT-2's tied 124M count the 39M-parameter table
once. Without value embeddings: at a 50,257-token vocabulary they would add 12 more such
tables, and no transformers architecture has them (export.py refuses them).
config/train_gpt2_124m_2019.py, run after this file, is GPT-2's own recipe at this size.

Each iteration is 16 sequences x 1024 tokens x 32 micro-steps (4 per GPU) = 524,288 tokens,
nanochat's batch at this size and GPT-3 small's. 19,073 iterations = 10B tokens, ~60 tokens per
parameter: as GPT-2's recipe, so the two compare at equal tokens (nanochat's own horizon for
this size is ~12 tokens per parameter).

What to expect (estimated, not measured here; `python plan.py config/train_gpt2_124m.py
--vocab_size=50257` for every card, its memory and an example cost): ~0.85 GFLOPs per token, so
at 40% of an H100's 989 TFLOP/s each GPU runs ~463K tokens/s, and 8 H100s take ~0.15 s per
iteration (Muon's Newton-Schulz steps included) and ~45 minutes for the run, evaluations
included; A100s (312 TFLOP/s) about three times longer. The log line's MFU says how close a run
gets. bfloat16 and TF32 are on by default on these cards. One GPU works too (torchrun
--nproc_per_node=1, or plain python): 8x the time per iteration.
"""
out_dir = "out/gpt2_124m"
dataset = "webtext"
# model: GPT-2 small's depth and width, heads of 128 channels as nanochat's d12
block = "modern"
value_embeddings = False
n_layer = 12
n_head = 6
n_embd = 768
block_size = 1024
dropout = 0.0
# batch: 16 x 1024 x 32 = 524,288 tokens per iteration, whatever the number of GPUs
batch_size = 16
gradient_accumulation_steps = 4 * 8
# optimizer and schedule: nanochat's (above)
optimizer = "muon"
muon_lr = 0.02
learning_rate = 0.008  # the head (nanochat's unembedding_lr)
embedding_lr = 0.3
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
lr_schedule = "wsd"
cooldown_fraction = 0.65
min_lr = 0.05 * 0.008
warmup_iters = 40
max_iters = 19073
# evaluation: 80 batches of 16 x 1024 tokens (1.3M tokens), shared by the 8 GPUs
eval_interval = 500
eval_iters = 80
log_interval = 10
compile = True
