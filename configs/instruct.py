# Instruction finetuning on the toy task set (docs/finetune.md): answer-only loss on
# prompt/response pairs and chats, char-level, from scratch.
# python data/make_instructions.py --n 6000 --out data/instructions.jsonl
# python prepare.py --input data/instructions.jsonl --name instruct --tokenizer char --block_size 256
# python train.py configs/instruct.py
# python sample.py --out_dir=out-instruct --prompt="Reverse the word: planet"
# python sample.py --out_dir=out-instruct --interactive
# python data/make_instructions.py --score out-instruct --n 200
out_dir = "out-instruct"
eval_interval = 300
eval_iters = 10
log_interval = 25
always_save_checkpoint = False

dataset = "instruct"
batch_size = 8
block_size = 256  # a prompt/response record is about 60 characters, a chat about 220: a row holds several

n_layer = 3
n_head = 4
n_embd = 96
dropout = 0.0

learning_rate = 3e-3
max_iters = 600
lr_decay_iters = 600
min_lr = 3e-4
beta2 = 0.99
warmup_iters = 50
