# The fastest way to a decent char-level Shakespeare model on a CPU: val loss below 1.88.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_quick.py
# A small model, the Muon optimizer, the modded-nanogpt model options, short context, a linear
# decay, and one evaluation at the end. Every choice below was measured on a quiet 2-core AMD
# EPYC with AVX2 only (float32; README, "The CPU speedrun"): 120 iterations reached val
# 1.861 / 1.857 / 1.853 (seeds 1337 / 1 / 2, one thread, 54 evaluation batches); the recipe
# before the schedule and head changes needed 140 iterations for 1.856 / 1.854 / 1.856.
out_dir = "out-shakespeare-quick"
eval_interval = 120  # evaluate only after the last step (eval_at_start below)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17)
eval_iters = 20
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 10  # the loss curve gets a point every 10 steps (free on a CPU)
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 32  # measured: batch 16 x 200 iterations 1.887, no better per second than 32 x 120 (1.886)
block_size = 64  # measured: 128 (batch 16) 1.852 against 1.856 at 140 iterations: within noise

n_layer = 4  # measured at 250 iterations: 3 layers 1.890, n_embd 96 1.897
n_head = 2  # head size 64: 1.846 against 1.856 for 4 heads (140 iterations)
n_embd = 128
dropout = 0.0  # too short a run to overfit

# model options (README "Model options"): at 120 iterations they took val from 2.120 to 1.925,
# with the wsd schedule (same seed and batches); left out one at a time (200 iterations, README):
# rotary +0.109, qk_norm +0.084, relu2 +0.033, zero_init_proj +0.021, rmsnorm +0.010
bigram = True  # alone: 2.043 at 120 iterations
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 5e-3  # swept at 200 iterations (val): 3e-3 1.789, 5e-3 1.775, 1e-2 1.801, 2e-2 1.824, 3e-2 1.825
max_iters = 120
lr_decay_iters = 120
lr_schedule = "wsd"
warmdown_frac = 1.0  # linear decay from the end of warmup to min_lr: 1.846 against 1.856 for the last half only
min_lr = 5e-4  # learning_rate / 10
beta2 = 0.95  # 1.851 against 1.856 for 0.99
warmup_iters = 5  # 1.849 against 1.856 for 20
muon_momentum_warmup = 50  # Muon's momentum 0.85 -> 0.95 over 50 steps: 1.851 against 1.856
