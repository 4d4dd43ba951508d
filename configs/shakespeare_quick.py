# The fastest way to a decent char-level Shakespeare model on a CPU: val loss below 1.88.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_quick.py
# A small model, the Muon optimizer at a high learning rate, the modded-nanogpt model options,
# short context, and one evaluation at the end. The figures (README, speed section) were
# measured on a shared 2-core AMD EPYC with AVX2 only (float32). Before the model options:
# 300 iterations reached 1.808 / 1.837 / 1.858 (seeds 1337 / 1 / 2) on a 2-core Xeon (bf16).
# With them, 200 iterations at lr 3e-2: val 1.814 / 1.839 / 1.870 over the whole val split (seeds
# 1337 / 1 / 2); at lr 5e-3 (below) 1.775 (seed 1337, 20 batches) in 66 s for the whole process on
# the quiet 2-core EPYC.
out_dir = "out-shakespeare-quick"
eval_interval = 140  # evaluate only after the last step (eval_at_start below)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17)
eval_iters = 20
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 50
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32  # measured: 48 x 220 iterations gave 1.816-1.851 over three seeds, in about the same time
block_size = 64  # measured: 32 (batch 64) no faster per step, 1.857 at 250 iterations

n_layer = 4  # measured at 250 iterations: 3 layers 1.890, n_embd 96 1.897
n_head = 4
n_embd = 128
dropout = 0.0  # too short a run to overfit

# model options (README "Model options"): at 120 iterations they took val from 2.120 to 1.925,
# with the wsd schedule (same seed and batches); at 90 iterations 1.979
bigram = True  # alone: 2.043 at 120 iterations
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 5e-3  # swept at 200 iterations on the AVX2 EPYC (val): 3e-3 1.789, 5e-3 1.775, 1e-2 1.801, 2e-2 1.824, 3e-2 1.825
max_iters = 140  # measured (val, 54 batches): seeds 1337 / 1 / 2 1.856 / 1.854 / 1.856; 160: 1.823 / 1.820 / 1.821
lr_decay_iters = 140
lr_schedule = "wsd"  # constant, then linear to min_lr over the last half
warmdown_frac = 0.5
min_lr = 5e-4  # learning_rate / 10
beta2 = 0.99
warmup_iters = 20
