# The best char-level Shakespeare model we get from at most 5 minutes on a 2-core CPU with
# bf16 (nanoGPT's README CPU recipe reaches val 1.59 in 4.3 minutes there): a 4x192 model,
# block 64, trained with Muon, evaluated only at the start and the end.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_cpu.py
# Measured on our shared 2-core Xeon: val 1.5554 in 199 s for the whole process (800
# iterations, ~235 ms each); --seed=1: 1.5499 in 215 s. 1000 iterations reached 1.5304 in
# 233 s. The AdamW recipe it replaced (1700 iterations at lr 3e-3) ended at 1.587 in 242 s.
out_dir = "out-shakespeare-cpu"
eval_interval = 800  # evaluate at the start and after the last step only
eval_iters = 40  # 40 x 48 x 64 tokens: about the whole val split
log_interval = 100
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 48  # measured with AdamW: batch 32 x 2000 iterations ended at 1.606, 48 x 1600 at 1.591
block_size = 64  # measured with AdamW: 128 (batch 16) ended worse, 1.612

n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # measured with AdamW: 0.1 ended at val 1.674 in 290 s, 0.0 at 1.606 in 250 s

optimizer = "muon"
learning_rate = 6e-3
max_iters = 800
lr_decay_iters = 800
min_lr = 6e-4
beta2 = 0.99
warmup_iters = 50
