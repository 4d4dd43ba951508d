# The 5-minute CPU speedrun: the best char-level Shakespeare model `python train.py
# configs/shakespeare_5min.py` gives in at most 300 s as a whole process, on any CPU. The run's
# length is time, not iterations: it trains for time_budget seconds, and its warmup, decay and
# Muon momentum warmup are fractions of that time (docs/speedrun.md), so a fast CPU takes more
# steps in the same five minutes and a slow one fewer, each with a whole schedule.
# python prepare.py shakespeare_char && python train.py configs/shakespeare_5min.py
# then: python eval.py --out_dir=out-shakespeare-5min   (the loss over the whole val split)
# Measured results, with the CPU, date and load: docs/speedrun.md.
out_dir = "out-shakespeare-5min"
time_budget = 270  # seconds of training; start-up, the final evaluation and the save fit in the other 30
max_iters = 1000000  # an upper bound only: the budget ends the run
eval_interval = 1000000  # evaluate only when the budget is spent (and not at the start)
eval_at_start = False  # the start's loss is known (ln 65 = 4.17)
eval_iters = 37  # 37 x 48 x 64 = 113,664 tokens: about the whole val split (111,540)
eval_train = False  # the final evaluation reads the val split only (the train loss is logged as it trains)
log_interval = 20  # the loss curve gets a point every 20 steps
always_save_checkpoint = False

dataset = "shakespeare_char"
batch_size = 48
block_size = 64

# the model of configs/shakespeare_cpu.py, with bf16 autocast where the CPU has bf16 units
# (dtype auto); a larger model did worse in the same time, even with bf16: docs/speedrun.md
n_layer = 4
n_head = 4
n_embd = 192
dropout = 0.0  # at the steps a float32 CPU buys in 270 s (about one epoch), the model does not overfit
warmdown_frac = 0.7  # at those ~350 steps a longer warmdown ends lower (three seeds: docs/speedrun.md)

# On a CPU with bf16 units (AMX: Intel Xeon 4th generation on; AVX512-BF16: AMD EPYC Zen 4 on)
# 270 s buy 1,400-2,200 of those steps and the model overfits its 1M characters: there it reads
# windows of 128 (more context per prediction, fewer steps) with a little dropout, and warms
# down over the last half. Measured on both kinds and at fixed step counts: docs/speedrun.md.
import hardware as _hardware
if _hardware.cpu_has_native_bf16():
    batch_size = 32
    block_size = 128
    dropout = 0.05
    warmdown_frac = 0.5
    eval_iters = 28  # 28 x 32 x 128 = 114,688 tokens: about the whole val split

bigram = True
rotary = True
activation = "relu2"
norm = "rmsnorm"
qk_norm = True
tie_head = False
zero_init_proj = True

optimizer = "muon"
learning_rate = 1.5e-3
weight_decay = 0.1
beta2 = 0.99
decay_lr = True
lr_schedule = "wsd"  # constant, then linear to min_lr over the budget's last warmdown_frac (above)
# with time_budget the schedule's iterations are shares of lr_decay_iters, which stands for the
# whole budget: warmup is the first 30 / 1000 of the time
lr_decay_iters = 1000
warmup_iters = 30
min_lr = 1.5e-4  # learning_rate / 10
