# Tiny Shakespeare with GPT-2 BPE tokens (vocabulary 50257): a small GPT trained from
# scratch. python prepare.py shakespeare && python train.py configs/shakespeare_bpe.py
# Meant for a GPU: on a 2-core CPU the 50257-wide output layer dominates each step and the
# 2000 iterations take well over an hour (measured: docs/configs.md).
out_dir = "out-shakespeare-bpe"
eval_interval = 250
eval_iters = 100
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare"
batch_size = 32
block_size = 128  # 1,115,394 characters in 338,025 GPT-2 tokens: 128 tokens ~ 420 characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 2000  # the corpus is only ~300k tokens: more overfits
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
