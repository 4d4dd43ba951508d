"""Train a GPT on a prepared dataset, on one device (cuda, mps or cpu) or under torchrun.

    python train.py configs/shakespeare_cpu.py
    python train.py configs/shakespeare.py --batch_size=32 --compile
    python train.py configs/shakespeare.py --init_from=resume     # continue from out_dir/ckpt.pt
    python train.py configs/finetune_shakespeare.py               # finetune GPT-2 (--init_from=gpt2 or a folder)
    torchrun --standalone --nproc_per_node=4 train.py configs/shakespeare.py

Reads data/<dataset>/{train,val}.bin and meta.json (see prepare.py), writes
<out_dir>/ckpt.pt (see checkpoint.py), <out_dir>/metrics.jsonl and its loss curves,
<out_dir>/loss.png (redrawn at every evaluation, see plot.py).

A dataset prepared with --documents=line|blank trains in document mode, with no flag: every
row of a batch starts at a document's boundary token and runs on through the documents
after it until the row is full (short documents packed one after another; the last one is
cut at the row's end), position embeddings restart at each document, attention never
crosses a boundary (model.document_mask), and the loss includes predicting each boundary,
which is how generation learns to stop. A document longer than block_size is also trained
from windows that start every block_size tokens inside it, their positions counted from
0 as in generation's sliding window (model.GPT.generate_stream), so no part of it is
left out. Rows whose window would run past the split's end are never drawn.
"""
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

import checkpoint
import hardware
import hf_format
import loading
import lora
import plot
import runlock
from config import parse_config
from dataset import Dataset
from errors import UserError, run_main
from model import GPT, MODEL_KEYS, GPTConfig
from tokenizer import Tokenizer
from training import TrainConfig, get_lr, get_muon_momentum, train_step


def conflicts(cfg: TrainConfig, explicit: set, fixed: dict, source: str) -> list[str]:
    """The flags set on this command line that contradict what an existing model fixes."""
    return [f"--{k}={getattr(cfg, k)} ({source} has {v})"
            for k, v in fixed.items() if k in explicit and getattr(cfg, k) != v]


# ---------------------------------------------------------------------------- logging

class MetricsLog:
    """Appends every log and eval record to <out_dir>/metrics.jsonl and, when a wandb run
    is given, logs the same record there; the loop never branches on the logger."""

    def __init__(self, out_dir: str, wandb_run=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb_run = wandb_run

    def log(self, record: dict):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}; free some disk space or choose "
                            f"another --out_dir (the last checkpoint is kept)") from None
        if self.wandb_run is not None:
            self.wandb_run.log(record)  # "iter" inside the record is the x-axis, as in nanoGPT

    def finish(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(cfg: TrainConfig):
    if not cfg.wandb_log:
        return None
    import wandb
    try:
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                          config=dataclasses.asdict(cfg), dir=cfg.out_dir)
    except Exception as e:  # not logged in, no network in online mode, ...
        raise UserError(f"wandb could not start ({type(e).__name__}: {e}); run `wandb login`, "
                        f"set WANDB_MODE=offline, or pass --wandb_log=false") from None


def draw_loss_curve(out_dir: str, progress: "Progress"):
    """Redraw <out_dir>/loss.png from metrics.jsonl (plot.py). A picture is never worth a
    training run: a failure to draw is reported and training goes on."""
    try:
        plot.write_loss_png(out_dir)
    except Exception as e:  # noqa: BLE001
        progress.write(f"warning: could not draw {Path(out_dir) / 'loss.png'}: {e}")


class Progress:
    """A tqdm bar with loss, lr and tokens/s on a terminal; plain log lines otherwise."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True)

    def step(self, record: dict | None):
        if self.bar is not None:
            self.bar.update(1)
            if record:
                self.bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_sec']:,.0f}")
        elif record:
            print(f"iter {record['iter']}: loss {record['train/loss']:.4f}, lr {record['lr']:.2e}, "
                  f"{record['tokens_per_sec']:,.0f} tokens/s, {record['step_ms']:.1f} ms/step", flush=True)

    def write(self, line: str):
        (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------- stop requests

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary, where the state
    is consistent; the loop then checkpoints and exits. A second Ctrl-C stops at once."""

    def __init__(self, ddp: bool = False):
        # under torchrun a Ctrl-C reaches each rank twice (from the terminal, and forwarded by
        # torchrun), so a repeat cannot mean "stop at once": every rank must reach the save
        self.repeat_stops_at_once = not ddp
        self.signum = None
        self.previous = {}
        windows = [signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else []  # Ctrl-Break in a Windows console
        for sig in (signal.SIGINT, signal.SIGTERM, *windows):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        if self.repeat_stops_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def requested(self, ddp: bool, device: str) -> bool:
        """Under DDP all ranks must stop at the same step, so they agree first: the answer is the
        all-reduce's, the same on every rank. A signal whose handler runs after this rank's
        contribution went out (the handler runs when the all-reduce returns, and a rank waits
        there for the others, so Ctrl-C often lands there) is kept for the next step's agreement:
        it is never overwritten with "no signal", which once lost both copies of a Ctrl-C on
        every rank until torchrun killed them."""
        if not ddp:
            return self.signum is not None
        t = torch.tensor([float(self.signum or 0)], device=device)  # the number: every rank names it
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        agreed = int(t.item())
        if agreed:
            self.signum = agreed
        return agreed != 0

    def restore(self):
        for sig, handler in self.previous.items():
            if self.signum is not None and not self.repeat_stops_at_once:
                handler = signal.SIG_IGN  # torchrun's forwarded copy may come late: the save is done
            signal.signal(sig, handler)


def resume_rng(ckpt: dict, rank: int, world_size: int, iter_num: int, seed: int, data_gen, master: bool):
    """Each rank takes back its own RNG states (dropout, batches), so a resumed run draws what an
    uninterrupted one would. With another number of processes that cannot be: the weights and
    the optimizer continue exactly, the batches come from fresh seeds."""
    rng = ckpt["rng"]
    if len(rng["data"]) == world_size:
        torch.set_rng_state(rng.get("torch_ranks", [rng["torch"]] * world_size)[rank])
        data_gen.set_state(rng["data"][rank])
        return
    if master:
        print(f"note: the checkpoint was written by {len(rng['data'])} process(es), this run has {world_size}: "
              f"the model and optimizer continue exactly, the batches are drawn afresh")
    fresh = seed + rank + 1_000_003 * iter_num  # not a replay of the run's first batches
    torch.manual_seed(fresh)
    data_gen.manual_seed(fresh)


def leave_process_group():
    """The end of a DDP run, on every rank: the barrier holds each rank until all are done (rank 0
    writes the last checkpoint while the others have nothing left to do), and only then does
    the group shut down, so no rank tears gloo down while another still uses it."""
    try:
        torch.distributed.barrier()
    except RuntimeError:  # a rank that failed (rank 0's last save, say) has said why
        sys.exit(1)
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- one run per out_dir

def lock_out_dir(lock: runlock.FolderLock, ddp: bool, master: bool, create: bool):
    """Rank 0 creates out_dir (when create) and takes its lock (runlock.py); under DDP every
    rank learns the outcome, so that all of them stop together when it failed."""
    error = None
    if master:
        try:
            if create:
                try:
                    lock.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UserError(f"cannot create --out_dir {lock.path.parent}: {e.strerror}; "
                                    f"choose another folder") from None
            if lock.path.parent.is_dir():
                lock.acquire()
        except UserError as e:
            error = str(e)
    if ddp:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        if master:
            raise UserError(error)
        sys.exit(2)  # rank 0 says why


# ---------------------------------------------------------------------------- main

def main(argv=None):
    # the lock on out_dir (and anything else held) is released however the run ends
    with contextlib.ExitStack() as held:
        run(argv, held)


def run(argv, held: contextlib.ExitStack):
    # a resumed run completes its settings from the checkpoint, so they are checked after that
    cfg, explicit = parse_config(TrainConfig, argv, prog="train.py", check=False)

    # distributed: torchrun sets RANK; otherwise one process on one device
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        from torch.distributed import init_process_group
        from torch.nn.parallel import DistributedDataParallel as DDP
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        backend = cfg.backend if torch.cuda.is_available() else "gloo"
        init_process_group(backend=backend)
        if torch.cuda.is_available():
            cfg.device = f"cuda:{local_rank}"
            torch.cuda.set_device(cfg.device)
    else:
        rank, world_size = 0, 1
    master = rank == 0

    # one run per out_dir: rank 0 holds <out_dir>/train.lock until this run ends
    out_lock = runlock.FolderLock(Path(cfg.out_dir) / "train.lock", f"--out_dir {cfg.out_dir}",
                                  "choose another --out_dir")
    held.callback(out_lock.release)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    ckpt = None
    if cfg.init_from == "resume":
        lock_out_dir(out_lock, ddp, master, create=False)  # before reading a checkpoint another run may write
        ckpt = checkpoint.load(ckpt_path)
        # checkpoints from before the model options have GPT-2's behaviour: GPTConfig's defaults
        ckpt["model_args"] = {**dataclasses.asdict(GPTConfig()), **ckpt["model_args"]}
        # the saved run's settings, with what was set explicitly now on top
        saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
        saved.pop("out_dir", None)  # the run continues where its checkpoint is now, even if moved
        fixed = {**{k: ckpt["model_args"][k] for k in MODEL_KEYS},  # the optimizer's state and groups:
                 "optimizer": ckpt["config"].get("optimizer", "adamw"),
                 "embed_lr_scale": ckpt["config"].get("embed_lr_scale", 1.0),
                 **{k: ckpt["config"].get(k, getattr(TrainConfig, k)) for k in lora.SETTINGS}}
        refused = conflicts(cfg, explicit, fixed, "checkpoint")
        if refused:
            raise UserError(f"cannot resume {ckpt_path} with a different model shape or optimizer: "
                            f"{', '.join(refused)}; drop these flags or start a new run with another --out_dir")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in explicit},
                                  init_from="resume")
    if cfg.problems():  # every invalid setting at once, before any work
        raise UserError("; ".join(cfg.problems()))
    hf_folder = hf_config = base = None
    if cfg.init_from not in ("scratch", "resume"):
        # a pretrained GPT-2 fixes the shape; a shorter --block_size crops its positions (as nanoGPT)
        hf_folder = hf_format.resolve(cfg.init_from)
        if (hf_folder / "ckpt.pt").is_file():  # a run of ours (a LoRA run's adapters merged): its weights only
            base = loading.load_model(str(hf_folder), "cpu")[:2]
        hf_config = base[0].config if base else hf_format.gpt_config(hf_folder)
        fixed = {k: getattr(hf_config, k) for k in MODEL_KEYS if k != "block_size"}
        refused = conflicts(cfg, explicit, fixed, cfg.init_from)
        if cfg.block_size > hf_config.block_size and "block_size" in explicit:
            refused.append(f"--block_size={cfg.block_size} ({cfg.init_from} has {hf_config.block_size} "
                           f"positions; a shorter block_size crops them)")
        if refused:
            raise UserError(f"cannot start from {cfg.init_from} with a different model shape: "
                            f"{', '.join(refused)}; drop these flags")
        block_size = cfg.block_size if "block_size" in explicit else hf_config.block_size
        cfg = dataclasses.replace(cfg, **fixed, block_size=block_size)
    if cfg.gradient_accumulation_steps % world_size:
        raise UserError(f"--gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be "
                        f"a multiple of the number of processes ({world_size})")
    accum = cfg.gradient_accumulation_steps // world_size  # micro-steps of this process

    precision = hardware.resolve(cfg.device, cfg.dtype)
    device = precision.device
    data = Dataset(cfg.data_dir, cfg.dataset)
    for split, n in data.sizes.items():
        if n <= cfg.block_size:
            raise UserError(f"the {split} split of {cfg.dataset!r} has {n} tokens, too few for one window of "
                            f"--block_size={cfg.block_size}; lower --block_size or prepare more text")
    tokenizer = Tokenizer.from_description(data.meta).describe()  # saved so sample.py needs no data/
    if hf_folder is not None:  # the model's tokenizer must be the one the dataset was prepared with
        theirs = (base[1] if base else hf_format.load_tokenizer(hf_folder)).describe()
        if (theirs["name"], theirs.get("chars")) != (tokenizer["name"], tokenizer.get("chars")):
            what = "a char-level" if theirs["name"] == "char" else f"the {theirs['name']}"
            raise UserError(f"--init_from={cfg.init_from} uses {what} tokenizer, but dataset {cfg.dataset!r} was "
                            f"prepared with {tokenizer['name']}; prepare the text with the model's tokenizer "
                            f"(`python prepare.py --input FILE --name NAME --tokenizer {theirs['name']}`)")
        if data.vocab_size > hf_config.vocab_size:
            raise UserError(f"dataset {cfg.dataset!r} has {data.vocab_size} tokens, more than the "
                            f"{hf_config.vocab_size} of --init_from={cfg.init_from}")
        tokenizer = {**theirs, **{k: v for k, v in tokenizer.items() if k == "documents"}}  # the data's mode

    lock_out_dir(out_lock, ddp, master, create=True)
    if master:
        print(f"{precision.reason}")
        print("config: " + json.dumps(dataclasses.asdict(cfg)))
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,}")
        if data.documents:
            print(f"document mode: {data.meta.get('train_documents', '?')} training documents; rows start at "
                  f"document starts, attention stays inside each document")

    torch.manual_seed(cfg.seed + rank)
    data_gen = torch.Generator().manual_seed(cfg.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # model
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model_args.update(vocab_size=data.vocab_size, dropout=cfg.dropout)
    if hf_config is not None:
        model_args.update(vocab_size=hf_config.vocab_size)
    if ckpt is not None:
        model_args.update({k: ckpt["model_args"][k] for k in MODEL_KEYS + ("vocab_size",)})
        if ckpt["model_args"]["vocab_size"] != data.vocab_size:
            raise UserError(f"{ckpt_path} was trained with vocab_size {ckpt['model_args']['vocab_size']} but "
                            f"dataset {cfg.dataset!r} has {data.vocab_size}; resume on the same dataset")
    problems = GPTConfig(**model_args).problems()  # what needs the dataset to check: the bigram table's size
    if problems:
        raise UserError(f"cannot build this model on {cfg.dataset!r}: " + "; ".join(problems))
    if hf_config is not None:
        model_config = GPTConfig(**{**model_args, "block_size": hf_config.block_size})
        if base:  # built again for this run's dropout
            model = GPT(model_config)
            model.load_state_dict(base[0].state_dict())
        else:
            model = hf_format.load_model(hf_folder, model_config)
        if cfg.block_size < hf_config.block_size:
            model.crop_block_size(cfg.block_size)
    else:
        model = GPT(GPTConfig(**model_args))
    lora_cfg = lora.from_settings(cfg)
    if lora_cfg is not None:  # before a resumed state is loaded: it holds the adapters
        n_adapters = lora.apply(model, lora_cfg)
    model.grad_checkpoint = cfg.grad_checkpoint
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    model.to(device)
    if master:
        print(f"number of parameters: {model.num_params() / 1e6:.2f}M")
        if lora_cfg is not None:
            print(f"LoRA rank {lora_cfg.rank} on {lora_cfg.targets}: {n_adapters:,} parameters train "
                  f"({100 * n_adapters / sum(p.numel() for p in model.parameters()):.2f}% of the model), the rest is frozen")

    scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.dtype == "float16")
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          precision.device_type, cfg.optimizer, cfg.head_lr_scale,
                                          cfg.embed_lr_scale)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])  # its state moves to the parameters' device
        if ckpt["scaler"]:  # empty when the saved run did not use float16: a fresh scaler starts
            scaler.load_state_dict(ckpt["scaler"])
        cuda_states = ckpt["rng"].get("cuda")
        if cuda_states and precision.device_type == "cuda" and len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        resume_rng(ckpt, rank, world_size, iter_num, cfg.seed, data_gen, master)
        was = ckpt.get("precision")
        if master and was and (was["device"], was["dtype"]) != (precision.device, precision.dtype):
            print(f"note: {ckpt_path} was trained on {was['device']} in {was['dtype']}, this run continues on "
                  f"{precision.device} in {precision.dtype}: the same state, but the numbers from here on "
                  f"will not match an uninterrupted run bit for bit")
    ckpt = None  # free memory

    raw_model = model  # saved weights always come from the uncompiled module
    if cfg.compile:
        if master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if precision.device_type == "cuda" else None)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches of each split (val only without eval_train). The
        batches come from their own generator, re-seeded every time: evaluations compare like
        with like, and they never move the training RNG (so exact resume holds)."""
        out = {}
        model.eval()
        for i, split in enumerate(("train", "val")):
            if split == "train" and not cfg.eval_train:
                continue
            gen = torch.Generator().manual_seed(cfg.seed + 1000 + i)
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                x, y, *positions = data.get_batch(split, cfg.batch_size, cfg.block_size, gen, device)
                with precision.autocast():
                    _, loss = model(x, y, positions=positions[0] if positions else None)
                losses[k] = loss.item()
            mean = losses.mean()
            if ddp:  # every rank takes the same checkpoint decision from the same numbers
                torch.distributed.all_reduce(mean)
                mean /= world_size
            out[split] = mean.item()
        model.train()
        return out

    def save_checkpoint():
        """Called on every rank (DDP gathers each rank's data-sampler state); rank 0 writes."""
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise UserError(f"the model holds NaN or inf at iteration {iter_num}; not saving it over "
                            f"{ckpt_path}. Lower --learning_rate or use --dtype=float32")
        states = [(data_gen.get_state(), torch.get_rng_state())]  # this rank's batches and dropout
        if ddp:
            states = [None] * world_size
            torch.distributed.all_gather_object(states, (data_gen.get_state(), torch.get_rng_state()))
        if not master:
            return
        checkpoint.save({
            "model": raw_model.state_dict(),
            "model_args": model_args,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iter_num": iter_num,
            "best_val_loss": best_val_loss,
            "config": dataclasses.asdict(cfg),
            "tokenizer": tokenizer,
            "lora": lora_cfg.to_dict() if lora_cfg is not None else None,  # readers merge it (lora.py)
            "instruct": data.instruct,  # the template of instruction data, for sample.py and app.py
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if precision.device_type == "cuda" else [],
                    "data": [data for data, _ in states],
                    "torch_ranks": [rng for _, rng in states]},
            "precision": {"device": precision.device, "dtype": precision.dtype},
        }, ckpt_path)

    log = MetricsLog(cfg.out_dir, start_wandb(cfg) if master else None)
    progress = Progress(iter_num, cfg.max_iters, enabled=master)
    stop = StopRequest(ddp)
    skip_eval_at = iter_num if cfg.init_from == "resume" else None  # that eval is in the checkpoint
    stopped_by = None  # the signal that stopped the run early
    t0, steps_timed = time.perf_counter(), 0
    try:
        while True:
            # learning rate for this iteration
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if cfg.optimizer == "muon":
                for group in optimizer.muon.param_groups:
                    group["momentum"] = get_muon_momentum(iter_num, cfg)

            # evaluate and checkpoint, every eval_interval and after the last step
            last = iter_num >= cfg.max_iters
            at_start = iter_num == 0 and not cfg.eval_at_start and not cfg.eval_only
            if (iter_num % cfg.eval_interval == 0 or last or cfg.eval_only) and iter_num != skip_eval_at and not at_start:
                losses = estimate_loss()
                if master:
                    train_part = f"train loss {losses['train']:.4f}, " if "train" in losses else ""
                    progress.write(f"step {iter_num}: {train_part}val loss {losses['val']:.4f}")
                    log.log({"iter": iter_num, **{f"{k}/loss": v for k, v in losses.items()}, "lr": lr})
                    draw_loss_curve(cfg.out_dir, progress)
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                if iter_num > 0 and (improved or cfg.always_save_checkpoint) and not cfg.eval_only:
                    save_checkpoint()
                    if master:
                        progress.write(f"saved checkpoint to {ckpt_path}")
                t0, steps_timed = time.perf_counter(), 0  # keep eval out of the throughput figures
            if last or cfg.eval_only:
                break
            if stop.requested(ddp, device):
                save_checkpoint()
                if master:
                    draw_loss_curve(cfg.out_dir, progress)  # with the steps since the last evaluation
                    progress.close()
                    name = signal.Signals(stop.signum).name
                    print(f"{name} received: saved iteration {iter_num} to {ckpt_path}. Resume with the same "
                          f"command plus --init_from=resume", file=sys.stderr)
                stopped_by = stop.signum
                break

            # forward, backward, clip, update
            batches = [data.get_batch("train", cfg.batch_size, cfg.block_size, data_gen, device)
                       for _ in range(accum)]
            loss, grad_norm = train_step(model, optimizer, scaler, batches, precision, cfg.grad_clip, ddp)
            if not torch.isfinite(grad_norm):
                if not scaler.is_enabled():
                    raise UserError(f"the loss became non-finite (NaN or inf) at iteration {iter_num}; stopped "
                                    f"without saving. The last checkpoint in {cfg.out_dir} is intact: lower "
                                    f"--learning_rate, set --grad_clip, or use --dtype=float32")
                if master:  # float16: the scaler skipped this step and lowered its scale
                    progress.write(f"iteration {iter_num}: gradients overflowed in float16, step skipped")

            # timing and logging (loss.item() waits for the device, so only every log_interval)
            record = None
            steps_timed += 1
            if iter_num % cfg.log_interval == 0 and master:
                train_loss = loss.item()  # of the last micro-step
                precision.synchronize()
                dt = (time.perf_counter() - t0) / steps_timed
                record = {"iter": iter_num, "train/loss": train_loss, "lr": lr,
                          "tokens_per_sec": tokens_per_iter / dt, "step_ms": dt * 1000}
                log.log(record)
                t0, steps_timed = time.perf_counter(), 0
            progress.step(record)
            iter_num += 1

    finally:
        stop.restore()
        progress.close()
    log.finish()
    if ddp:
        leave_process_group()
    if stopped_by is not None:
        sys.exit(128 + stopped_by)
    if master and not cfg.eval_only:
        print(f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, checkpoint in {ckpt_path}")


def exit_rank():
    """How a torchrun rank process ends, with main's exit code: flush, then os._exit, which skips
    the interpreter's teardown. DDP leaves references to the gloo process group that nothing can
    drop (even a bare DistributedDataParallel(nn.Linear), deleted, keeps its gloo and TCPStore
    threads alive after destroy_process_group and gc), so those threads meet the interpreter's
    finalization, where about 1 rank process in 100 here died with SIGABRT ("terminate called
    without an active exception"), failing a finished run. By then everything is saved and the
    lock released; the barrier in leave_process_group kept every rank until all were done."""
    code = 0
    try:
        run_main(main)
    except SystemExit as e:  # sys.exit(n) of main and run_main: UserError, a stop by signal
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    hardware.set_cpu_threads()
    if "RANK" in os.environ:  # under torchrun
        exit_rank()
    run_main(main)
