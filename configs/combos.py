# Documents mode on synthetic boxing combos (one per line), about a minute on a 2-core CPU.
# python data/make_combos.py --n 12000 --out data/combos.txt
# python prepare.py --input data/combos.txt --name combos --tokenizer char --documents line --block_size 128
# python train.py configs/combos.py
# python sample.py --out_dir=out-combos --prompt="" --num_samples=60 > samples.txt
# python data/make_combos.py --score samples.txt --out data/combos.txt
# Measured on our shared 2-core EPYC (load ~20): val 0.275 after 300 iterations (415 s of CPU,
# ~80 s on a quiet core); 60 samples 80.0% valid combos, 66.7% valid and new (88.3% / 81.7%
# at --temperature=0.5). With prepare --tokenizer bpe:400 --block_size 32 --name combos_bpe
# and --dataset=combos_bpe --block_size=32: 100% valid, 71.7% new.
out_dir = "out-combos"
eval_interval = 300  # evaluate at the start and after the last step only
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = "combos"
batch_size = 16
block_size = 128  # combos are 46 characters on average (133 at most): a row packs about 3

n_layer = 3
n_head = 4
n_embd = 96
dropout = 0.0

learning_rate = 3e-3
max_iters = 300
lr_decay_iters = 300
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 30
