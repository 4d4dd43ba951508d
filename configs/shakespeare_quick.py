# The fastest way to a decent char-level Shakespeare model on a CPU: val loss below 1.88.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_quick.py
# A small model, the Muon optimizer at a high learning rate, short context, and one
# evaluation at each end. Measured on a shared 2-core Xeon (bf16), 300 iterations of 80 to
# 122 ms each depending on the host's load: val 1.808 (seed 1337), 1.837 (seed 1), 1.858
# (seed 2), 40 to 46 s for the whole process on a busy host. 250 iterations are not enough
# for every seed (1.852, 1.896, 1.900). The AdamW recipe it replaced (4x192, 600 iterations
# at lr 4e-3) ended at 1.859 in 77 s; AdamW on this 4x128 model needs about 600 iterations
# (1.869 at lr 1e-2).
out_dir = "out-shakespeare-quick"
eval_interval = 300  # evaluate only at the start and the end
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32  # measured: 48 x 220 iterations gave 1.816-1.851 over three seeds, in about the same time
block_size = 64  # measured: 32 (batch 64) no faster per step, 1.857 at 250 iterations

n_layer = 4  # measured at 250 iterations: 3 layers 1.890, n_embd 96 1.897
n_head = 4
n_embd = 128
dropout = 0.0  # too short a run to overfit

optimizer = "muon"
learning_rate = 3e-2  # measured at 250 iterations: 1e-2 -> 1.892, 2e-2 -> 1.864, 3e-2 -> 1.852
max_iters = 300
lr_decay_iters = 300
min_lr = 3e-3
beta2 = 0.99
warmup_iters = 20
