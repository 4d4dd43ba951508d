# Finetune GPT-2 small (124M) on tiny Shakespeare on a CPU: the CPU-sized finetune_shakespeare.
# python prepare.py shakespeare && python train.py configs/finetune_shakespeare_cpu.py
# init_from "gpt2" reads transformers' local cache (`hf download openai-community/gpt2` on a machine
# with internet, then copy ~/.cache/huggingface here); --init_from=PATH takes a downloaded folder.
# Sized for a 2-core CPU: block 256 (the first 256 of GPT-2's 1024 positions are kept), 2,048 tokens
# per iteration, ~1.5 TFLOP each (6 x 124M x 2,048). Not yet timed with real GPT-2 weights: what
# was run, and what is left to measure, is in docs/configs.md.
out_dir = "out-shakespeare-ft-cpu"
eval_interval = 50
eval_iters = 10
log_interval = 5
always_save_checkpoint = False

dataset = "shakespeare"
init_from = "gpt2"
block_size = 256

batch_size = 4
gradient_accumulation_steps = 2
max_iters = 100

learning_rate = 3e-5
decay_lr = False
