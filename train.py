"""Train a GPT on a prepared dataset, on one device (cuda, mps or cpu) or under torchrun.

    python train.py configs/shakespeare_cpu.py
    python train.py configs/shakespeare.py --batch_size=32 --compile
    python train.py configs/shakespeare.py --init_from=resume     # continue from out_dir/ckpt.pt
    python train.py configs/shakespeare_5min.py                   # a time budget, not iterations (docs/speedrun.md)
    python train.py configs/shakespeare.py --patience=3           # stop when val stops improving; keep the best
    python train.py configs/finetune_shakespeare.py               # finetune GPT-2 (--init_from=gpt2 or a folder)
    torchrun --standalone --nproc_per_node=4 train.py configs/shakespeare.py

Reads data/<dataset>/{train,val}.bin and meta.json (see prepare.py), writes
<out_dir>/ckpt.pt (see checkpoint.py), <out_dir>/metrics.jsonl and its loss curves,
<out_dir>/loss.png (redrawn at every evaluation, see plot.py).

A dataset prepared with --documents=line|blank trains in document mode, with no flag: rows
start at documents, position embeddings restart at each one, attention never crosses a
boundary (dataset.py says how rows are drawn), and the loss includes predicting each
boundary, which is how generation learns to stop.

Read top to bottom: what the loop logs and how it stops, the setup steps (process group,
resumed or pretrained settings, data, model and optimizer, RNG), evaluation and checkpoints,
then run(): the setup, one step after another, and the training loop. The settings
(training.TrainConfig), the learning-rate schedule and the optimizer step live in training.py,
which bench.py shares.
"""
import errors
errors.starting(__name__)  # a missing requirement or a Ctrl-C while torch imports: one line, no traceback
import gc
gc.disable()  # no garbage collection while torch imports: start-up and exit ~0.3 s faster (docs/speed.md)
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import checkpoint
import cpu_kernels
import durable
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
from tokenizer import mismatch as tokenizer_mismatch
from training import TimeBudget, TrainConfig, get_lr, schedule_iter, set_schedule, train_step
gc.freeze()  # what the imports made is never traversed again, not even at exit
gc.enable()


# ---------------------------------------------------------------------------- logging

class MetricsLog:
    """Appends every log and eval record to <out_dir>/metrics.jsonl (out_dir None: no file) and,
    when a wandb run is given, logs the same record there; the loop never branches on the logger."""

    def __init__(self, out_dir: str | None, wandb_run=None):
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir is not None else None  # None: no file
        self.wandb_run = wandb_run

    def log(self, record: dict):
        try:
            if self.path is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror}; free some disk space or choose "
                            f"another --out_dir (the last checkpoint is kept)") from None
        if self.wandb_run is not None:  # "iter" inside the record is the x-axis, as in nanoGPT
            if "val/loss" not in record and "train/loss" in record:  # one batch's loss, not an evaluation's
                record = {("train/batch_loss" if k == "train/loss" else k): v for k, v in record.items()}
            self.wandb_run.log(record)

    def finish(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()


def start_wandb(cfg: TrainConfig, run_id: str | None = None):
    """The wandb run (--wandb_log): a new one, or with run_id (the checkpoint's) the run this
    training started, continued, so a resumed run is one run in wandb as it is in metrics.jsonl."""
    if not cfg.wandb_log:
        return None
    import wandb
    try:
        run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=dataclasses.asdict(cfg),
                         dir=cfg.out_dir, **({"id": run_id, "resume": "allow"} if run_id else {}))
        run.define_metric("iter")
        run.define_metric("*", step_metric="iter")  # charts by iteration, not by log call: runs line up
        return run
    except Exception as e:  # not logged in, no network in online mode, ...
        raise UserError(f"wandb could not start ({type(e).__name__}: {e}); run `wandb login`, "
                        f"set WANDB_MODE=offline, or pass --wandb_log=false") from None


class LossCurve:
    """<out_dir>/loss.png, redrawn from metrics.jsonl (plot.py) after evaluations. A drawing takes
    a few tenths of a second, so one comes at most once per twenty times its own duration (the
    curve costs at most about 5% of the run: evaluations a second apart, a small model's, used to
    spend a third of their time drawing); the last evaluation and a stop always draw. A picture is
    never worth a training run: a failure to draw is reported and training goes on."""

    def __init__(self, out_dir: str, progress: "Progress"):
        self.out_dir, self.progress, self.next_at = out_dir, progress, 0.0

    def draw(self, now: bool = False):
        start = time.perf_counter()
        if not now and start < self.next_at or not (Path(self.out_dir) / "metrics.jsonl").is_file():
            return  # (nothing logged yet: a Ctrl-C before the first step)
        try:
            plot.write_loss_png(self.out_dir)
        except Exception as e:  # noqa: BLE001
            self.progress.write(f"warning: could not draw {Path(self.out_dir) / 'loss.png'}: {e}")
        end = time.perf_counter()
        self.next_at = end + 19 * (end - start)


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


# ---------------------------------------------------------------------------- what the loop reports

def step_record(iter_num: int, loss, lr: float, precision, t0: float, steps_timed: int, tokens_per_iter: int,
                budget, cfg: TrainConfig) -> dict:
    """The log record of the steps since t0. loss.item() waits for the device, which is why the
    loop asks for it only every log_interval."""
    train_loss = loss.item()  # of the last micro-step
    precision.synchronize()
    dt = (time.perf_counter() - t0) / steps_timed
    record = {"iter": iter_num, "train/loss": train_loss, "lr": lr,
              "tokens_per_sec": tokens_per_iter / dt, "step_ms": dt * 1000}
    if cfg.time_budget:
        record["progress"] = budget.spent / cfg.time_budget  # of the budget, before this step
    return record


def report_eval(iter_num: int, losses: dict, lr: float, log: MetricsLog, progress: Progress):
    """An evaluation's losses: on the console and in the metrics log (loss.png: LossCurve)."""
    train_part = f"train loss {losses['train']:.4f}, " if "train" in losses else ""
    progress.write(f"step {iter_num}: {train_part}val loss {losses['val']:.4f}")
    log.log({"iter": iter_num, **{f"{k}/loss": v for k, v in losses.items()}, "lr": lr})


def report_stop(signum: int, iter_num: int, ckpt_path: Path, progress: Progress, curve: LossCurve,
                kept_best: int | None = None):
    """After a stop by signal, once its checkpoint is saved (or, with --patience, the best one
    kept, from iteration kept_best): how to resume, then the curve up to now (said first: a
    second Ctrl-C while it draws must not hide that the run is saved)."""
    progress.close()
    what = (f"kept {ckpt_path}, the best model (iteration {kept_best}; --patience keeps the best)"
            if kept_best is not None else f"saved iteration {iter_num} to {ckpt_path}")
    print(f"{signal.Signals(signum).name} received: {what}. Resume with the same command plus "
          f"--init_from=resume", file=sys.stderr, flush=True)
    curve.draw(now=True)  # with the steps since the last evaluation


class Patience:
    """--patience: the evaluations since the val loss last improved, and where it did. With
    patience, ckpt.pt is written only on an improvement, so it always holds the best model."""

    def __init__(self, patience: int, iter_num: int):
        self.patience, self.since_best, self.best_iter = patience, 0, iter_num

    def run_out(self, improved: bool, iter_num: int) -> bool:
        """Count this evaluation; True when patience evaluations in a row brought no better val loss."""
        self.since_best, self.best_iter = (0, iter_num) if improved else (self.since_best + 1, self.best_iter)
        return self.patience > 0 and self.since_best >= self.patience


def report_patience(patience: int, iter_num: int, ckpt_path: Path, best_val_loss: float, best_iter: int,
                    progress: Progress, budget_note: str = ""):
    where = (f"{ckpt_path} holds the best, val loss {best_val_loss:.4f} at iteration {best_iter}" if best_iter > 0
             else f"the best was the first evaluation's, {best_val_loss:.4f}, before any training (never saved)")
    progress.write(f"no better val loss in {patience} evaluation{'s' if patience != 1 else ''}: stopped at "
                   f"iteration {iter_num}{budget_note}; {where}")


def report_skipped_step(iter_num: int, scaler, out_dir: str, progress: Progress, master: bool):
    """A step whose gradients were not finite, so it was not taken. In float16 the scaler lowered
    its scale and training goes on; in other dtypes the run stops, its last checkpoint intact."""
    if not scaler.is_enabled():
        raise UserError(f"the loss became non-finite (NaN or inf) at iteration {iter_num}; stopped "
                        f"without saving. The last checkpoint in {out_dir} is intact: lower "
                        f"--learning_rate, set --grad_clip, or use --dtype=float32")
    if master:
        progress.write(f"iteration {iter_num}: gradients overflowed in float16, step skipped")


# ---------------------------------------------------------------------------- stop requests

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary, where the state
    is consistent; the loop then checkpoints and exits. A second Ctrl-C stops at once. The
    request is said at once (a step or an evaluation of a large model can take minutes), and
    an evaluation under way is dropped (one process; under torchrun the ranks finish it)."""

    def __init__(self, ddp: bool = False, master: bool = True):
        # under torchrun a Ctrl-C reaches each rank twice (from the terminal, and forwarded by
        # torchrun), so a repeat cannot mean "stop at once": every rank must reach the save
        self.repeat_stops_at_once = not ddp
        self.master = master
        self.signum = None
        self.previous = {}
        windows = [signal.SIGBREAK] if hasattr(signal, "SIGBREAK") else []  # Ctrl-Break in a Windows console
        for sig in (signal.SIGINT, signal.SIGTERM, *windows):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = signum
        if self.repeat_stops_at_once:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if first and self.master:  # os.write: a print here could land inside one the loop is making
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = "; Ctrl-C again stops at once, unsaved" if self.repeat_stops_at_once else ""
            with contextlib.suppress(OSError, ValueError, AttributeError):  # (no usable stderr: nothing said)
                os.write(sys.stderr.fileno(), f"\n{name}: stopping at the end of this step, with a checkpoint "
                                              f"to resume from{again}\n".encode())

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

def lock_out_dir(lock: runlock.FolderLock, ddp: bool, master: bool, create: bool, keep: Path | None = None,
                 eval_only_from: str | None = None):
    """Rank 0 creates out_dir (when create) and takes its lock (runlock.py), then refuses a
    checkpoint keep that this run would replace (a new run started where another left its
    model), or, for --eval_only of a model from eval_only_from (scratch, a GPT-2...), would
    leave unevaluated while it evaluates another; under DDP every rank learns the outcome, so
    that all of them stop together when it failed."""
    error = None
    if master:
        try:
            if create:
                try:
                    lock.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    what = "it is a file, not a folder" if lock.path.parent.is_file() else e.strerror
                    raise UserError(f"cannot create --out_dir {lock.path.parent}: {what}; "
                                    f"choose another folder") from None
            if lock.path.parent.is_dir():
                lock.acquire()
            if keep is not None and keep.exists() and eval_only_from:
                raise UserError(f"--eval_only evaluates the model this run starts from (--init_from={eval_only_from}), "
                                f"not the one in {keep}: add --init_from=resume to evaluate that one (or run "
                                f"python eval.py --out_dir={errors.quoted(keep.parent)}), or choose another --out_dir")
            if keep is not None and keep.exists():
                raise UserError(f"--out_dir {keep.parent} already holds a model ({keep.name}) that this new run "
                                f"would replace; continue it with --init_from=resume, or choose another "
                                f"--out_dir (or move {keep} away to start over there)")
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


# ---------------------------------------------------------------------------- setup steps

class Processes(NamedTuple):
    """This process among the run's: one of world_size ranks under torchrun, else the only one."""
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:  # rank 0 prints, logs and writes the checkpoint
        return self.rank == 0


def start_process_group(cfg: TrainConfig, explicit: set = frozenset()) -> Processes:
    """Under torchrun (it sets RANK), join the process group: NCCL on GPUs (--backend), gloo on
    CPUs; on GPUs each rank takes the device of its local rank. --device=cpu keeps the ranks on
    the CPU, GPUs or not, and so does the checkpoint's device for a resume that passes none (read
    before the group is joined: the backend depends on it). Otherwise one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes()
    procs = Processes(True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    if cfg.init_from == "resume" and "device" not in explicit:
        try:  # (a damaged or missing checkpoint is said by resume_settings, after the lock)
            saved = torch.load(Path(cfg.out_dir) / "ckpt.pt", map_location="cpu", mmap=True, weights_only=False)
            cfg.device = (saved.get("config") or {}).get("device", cfg.device)
            del saved  # (its memory map closed: the run replaces that file)
        except Exception:  # noqa: BLE001
            pass
    if cfg.device.startswith("mps"):
        raise UserError("torchrun runs its processes on CUDA GPUs (NCCL) or on CPUs (gloo), not on MPS: run "
                        "train.py without torchrun to train on the Mac's GPU, or pass --device=cpu")
    on_gpus = torch.cuda.is_available() and not cfg.device.startswith("cpu")
    asked = cfg.device
    cfg.device = ddp_device(cfg.device, procs.local_rank, on_gpus)
    if procs.rank == 0 and "device" in explicit and asked.startswith("cuda:") and asked != cfg.device:
        print(f"note: under torchrun each process takes the GPU of its local rank ({cfg.device} for rank 0), "
              f"not --device={asked}; CUDA_VISIBLE_DEVICES chooses which GPUs torchrun uses")
    if procs.rank == 0 and "backend" in explicit and not on_gpus and cfg.backend != "gloo":
        print(f"note: --backend={cfg.backend} is for GPUs; these processes run on the CPU, so with gloo")
    torch.distributed.init_process_group(backend=cfg.backend if on_gpus else "gloo")
    if on_gpus:
        torch.cuda.set_device(cfg.device)
    return procs


def ddp_device(device: str, local_rank: int, on_gpus: bool) -> str:
    """A torchrun rank's device: its own GPU (cuda:<local rank>) on GPUs, else the CPU (auto on
    a machine without CUDA would pick a Mac's MPS, which gloo cannot reduce)."""
    return f"cuda:{local_rank}" if on_gpus else "cpu" if device == "auto" else device


def conflicts(cfg: TrainConfig, explicit: set, fixed: dict, source: str) -> list[str]:
    """The settings of this command line (its flags, its config file) that contradict what an
    existing model fixes, each said with its value and the model's."""
    from_file = getattr(explicit, "from_file", set())
    return [f"--{k}={getattr(cfg, k)}{' (set by the config file)' if k in from_file else ''} ({source} has {v})"
            for k, v in fixed.items() if k in explicit and getattr(cfg, k) != v]


def drop_them(cfg: TrainConfig, explicit: set, fixed: dict) -> str:
    """How to clear conflicts(): drop the flags, and a config file that sets a model's shape."""
    from_file = getattr(explicit, "from_file", set())
    if any(k in from_file and getattr(cfg, k) != v for k, v in fixed.items()):
        return "drop these flags, and leave out the config file (it sets a model shape of its own)"
    return "drop these flags"


def resume_settings(cfg: TrainConfig, explicit: set, ckpt_path: Path) -> tuple[TrainConfig, dict]:
    """--init_from=resume: the checkpoint, and the saved run's settings with the ones set
    explicitly now on top. Flags that contradict what the checkpoint fixes (the model's shape
    and options, the optimizer's state and groups) are refused."""
    ckpt = checkpoint.load(ckpt_path)
    # checkpoints from before the model options have GPT-2's behaviour: GPTConfig's defaults
    ckpt["model_args"] = {**dataclasses.asdict(GPTConfig()), **ckpt["model_args"]}
    saved = {k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__}
    saved.pop("out_dir", None)  # the run continues where its checkpoint is now, even if moved
    fixed = {**{k: ckpt["model_args"][k] for k in MODEL_KEYS},
             "optimizer": ckpt["config"].get("optimizer", "adamw"),
             "embed_lr_scale": ckpt["config"].get("embed_lr_scale", 1.0),
             **{k: ckpt["config"].get(k, getattr(TrainConfig, k)) for k in lora.SETTINGS}}  # the adapters
    refused = conflicts(cfg, explicit, fixed, "checkpoint")
    if refused:
        raise UserError(f"cannot resume {ckpt_path} with a different model shape or optimizer: "
                        f"{', '.join(refused)}; {drop_them(cfg, explicit, fixed)}, or start a new run with "
                        f"another --out_dir")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in saved.items() if k not in explicit}, init_from="resume")
    return cfg, ckpt


class Pretrained(NamedTuple):
    """A GPT-2 to start from (--init_from): its Hugging Face folder and its configuration; or a
    folder holding a ckpt.pt of ours, whose model (a LoRA run's merged) and tokenizer are `ours`."""
    folder: Path
    config: GPTConfig
    ours: tuple | None = None  # (GPT, Tokenizer) from loading.load_model


def pretrained_settings(cfg: TrainConfig, explicit: set) -> tuple[TrainConfig, Pretrained | None]:
    """--init_from=a GPT-2 (name or folder): that model, and the settings with the shape it
    fixes; a shorter --block_size crops its positions (as nanoGPT). (cfg, None) for a new
    model or a resumed one."""
    if cfg.init_from in ("scratch", "resume"):
        return cfg, None
    hf_folder = hf_format.resolve(cfg.init_from)
    ours = loading.load_model(str(hf_folder), "cpu")[:2] if (hf_folder / "ckpt.pt").is_file() else None
    hf_config = ours[0].config if ours else hf_format.gpt_config(hf_folder)
    fixed = {k: getattr(hf_config, k) for k in MODEL_KEYS if k != "block_size"}
    refused = conflicts(cfg, explicit, fixed, cfg.init_from)
    if cfg.block_size > hf_config.block_size and "block_size" in explicit:
        refused.append(f"--block_size={cfg.block_size} ({cfg.init_from} has {hf_config.block_size} "
                       f"positions; a shorter block_size crops them)")
    if refused:
        raise UserError(f"cannot start from {cfg.init_from} with a different model shape: "
                        f"{', '.join(refused)}; {drop_them(cfg, explicit, fixed)}")
    block_size = cfg.block_size if "block_size" in explicit else hf_config.block_size
    return dataclasses.replace(cfg, **fixed, block_size=block_size), Pretrained(hf_folder, hf_config, ours)


def open_dataset(cfg: TrainConfig, pretrained: Pretrained | None) -> tuple[Dataset, dict]:
    """The dataset, checked against the run: each split holds a window of block_size, and a
    pretrained model's tokenizer is the one the text was prepared with. Returns it and the
    description of its tokenizer, saved in the checkpoint so that sample.py needs no data/."""
    data = Dataset(cfg.data_dir, cfg.dataset)
    for split, n in data.sizes.items():
        if n <= cfg.block_size:
            raise UserError(f"the {split} split of {cfg.dataset!r} has {n} tokens, too few for one window of "
                            f"--block_size={cfg.block_size}; lower --block_size or prepare more text")
    tokenizer = Tokenizer.from_description(data.meta).describe()
    if pretrained is None:
        return data, tokenizer
    theirs = (pretrained.ours[1] if pretrained.ours else hf_format.load_tokenizer(pretrained.folder)).describe()
    if differ := tokenizer_mismatch(theirs, tokenizer, boundary=False):
        fix = (f"prepare the text with the model's tokenizer (`python prepare.py --input FILE --name NAME "
               f"--tokenizer {theirs['name']}`)" if theirs["name"] not in ("char", "bpe") else
               f"its vocabulary came from the text it was trained on, so it reads only text prepared with that "
               f"vocabulary (`python prepare.py --input FILE --name NAME "
               f"--tokenizer={errors.quoted(cfg.init_from)}`); for a task in another alphabet or in records, "
               f"start from GPT-2 (--init_from=gpt2, data prepared with --tokenizer gpt2) or train a new model "
               f"on this dataset (--init_from=scratch)")
        raise UserError(f"--init_from={cfg.init_from} cannot read dataset {cfg.dataset!r}: {differ}; {fix}")
    if data.vocab_size > pretrained.config.vocab_size:
        why = (": its documents' boundary token, which a model trained on plain text has no id for; start from "
               "GPT-2 or train a new model on it (--init_from=scratch)" if data.eot_id is not None
               and data.eot_id >= pretrained.config.vocab_size else "")
        raise UserError(f"dataset {cfg.dataset!r} has {data.vocab_size} tokens, more than the "
                        f"{pretrained.config.vocab_size} of --init_from={cfg.init_from}{why}")
    return data, {**theirs, **{k: v for k, v in tokenizer.items() if k == "documents"}}  # the data's mode


def micro_steps(cfg: TrainConfig, procs: Processes) -> int:
    """Micro-steps of this process: gradient_accumulation_steps counts them over all ranks."""
    if problem := accumulation_problem(cfg, procs):
        raise UserError(problem)
    return cfg.gradient_accumulation_steps // procs.world_size


def accumulation_problem(cfg: TrainConfig, procs: Processes) -> str | None:
    if cfg.gradient_accumulation_steps >= 1 and cfg.gradient_accumulation_steps % procs.world_size:
        n = procs.world_size * -(-cfg.gradient_accumulation_steps // procs.world_size)  # the next multiple
        return (f"--gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the "
                f"number of processes ({procs.world_size}): it counts the micro-steps of all of them together, "
                f"as in nanoGPT; pass --gradient_accumulation_steps={n}")
    return None


def training_memory(n_params: int) -> str:
    """What n float32 parameters take while they train (weights, gradients, AdamW's two moments)."""
    size = 16 * n_params
    return f"{size / 2 ** 30:.1f} GB" if size >= 2 ** 30 else f"{size / 2 ** 20:.0f} MB"


BIGRAM_RECIPE_LIMIT = 10  # a config file's --bigram is refused where its table outweighs the rest this many times


def recipe_bigram_too_large(cfg: TrainConfig, explicit: set, vocab_size: int) -> str | None:
    """A recipe's bigram table (a config file set --bigram, for char vocabularies) on a dataset
    whose vocabulary makes it many times the model: a bpe:1000 dataset under a CPU recipe builds
    GBs for a 2M model. Why to refuse it, or None; --bigram=True on the command line keeps it."""
    if not cfg.bigram or "bigram" not in getattr(explicit, "from_file", set()):
        return None
    table = (vocab_size + 1) * vocab_size * cfg.n_embd
    rest = 12 * cfg.n_layer * cfg.n_embd ** 2 + vocab_size * cfg.n_embd * (1 if cfg.tie_head else 2)  # about
    if table <= BIGRAM_RECIPE_LIMIT * rest:
        return None
    return (f"the config file's bigram = True adds a table of {table / 1e6:.0f}M parameters on dataset "
            f"{cfg.dataset!r} (a vocabulary of {vocab_size:,} tokens), about {table / rest:.0f}x the rest of the "
            f"model (~{training_memory(table)} with its gradients and optimizer state; it pays on small char "
            f"vocabularies): pass "
            f"--bigram=False, or --bigram=True to keep it")


def announce_model(raw_model: GPT, cfg: TrainConfig):
    """The model's size (nanoGPT's count), the lookup tables it leaves out when they outweigh the
    rest, and with LoRA the share of it that trains."""
    counted, total = raw_model.num_params(), sum(p.numel() for p in raw_model.parameters())
    tables = f" (and {(total - counted) / 1e6:.2f}M in lookup tables)" if total - counted > counted else ""
    print(f"number of parameters: {counted / 1e6:.2f}M{tables}")
    if raw_model.config.bigram and (n := raw_model.bigram.weight.numel()) > counted:
        V, C = raw_model.config.vocab_size, raw_model.config.n_embd
        print(f"note: the bigram table alone holds {n / 1e6:.2f}M parameters ({V + 1:,} x {V:,} rows of {C}), "
              f"{n / counted:.0f}x the rest of the model; with its gradients and optimizer state it takes "
              f"~{training_memory(n)}: --bigram=False drops it (it pays on small char vocabularies)")
    if cfg.lora_rank:
        n = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        print(f"LoRA rank {cfg.lora_rank} on {cfg.lora_targets}: {n:,} parameters train "
              f"({100 * n / sum(p.numel() for p in raw_model.parameters()):.2f}% of the model), the rest is frozen")


def run_description(cfg: TrainConfig, model_args: dict, tokenizer: dict, data: Dataset,
                    precision: hardware.Precision) -> dict:
    """What every checkpoint of this run says about it besides the weights and the state."""
    return {"model_args": model_args, "config": dataclasses.asdict(cfg), "tokenizer": tokenizer,
            "lora": lora.from_settings(cfg).to_dict() if cfg.lora_rank else None,  # readers merge it (lora.py)
            "instruct": data.instruct,  # the template of instruction data, for sample.py and app.py
            "data_fingerprint": data.fingerprint(),  # a resume tells by it that its data changed
            "precision": {"device": precision.device, "dtype": precision.dtype,
                          "threads": torch.get_num_threads()}}  # a CPU's sums depend on its thread count


def data_changed(ckpt: dict, cfg: TrainConfig, data: Dataset) -> str | None:
    """How the data a resumed run trains on differs from its checkpoint's (None: the same), by
    the dataset's fingerprint (a checkpoint from before fingerprints: by its name)."""
    was = ckpt.get("data_fingerprint")
    name = (ckpt.get("config") or {}).get("dataset")
    if was is None:
        return None if name in (None, cfg.dataset) else f"the dataset is {cfg.dataset!r}, the checkpoint's was {name!r}"
    if was == data.fingerprint():
        return None
    if name != cfg.dataset:
        return f"the dataset is {cfg.dataset!r}, the checkpoint's was {name!r}"
    return f"dataset {cfg.dataset!r} was prepared again since the checkpoint, from other text or with other settings"


def announce(cfg: TrainConfig, precision: hardware.Precision, data: Dataset, tokens_per_iter: int,
             start_iter: int = 0):
    """What this run is, printed once by rank 0: the precision and why, the resolved config."""
    print(f"{precision.reason}")
    print("config: " + json.dumps(dataclasses.asdict(cfg)))
    print(f"tokens per iteration: {tokens_per_iter:,}")
    if data.documents:
        print(f"document mode: {data.meta.get('train_documents', '?')} training documents; rows start at "
              f"document starts, attention stays inside each document")
    last_lr = get_lr(cfg.max_iters, cfg)
    trains = cfg.max_iters > start_iter and not (cfg.time_budget or cfg.eval_only)  # by iterations, at all
    if cfg.decay_lr and trains and cfg.warmup_iters > cfg.max_iters:  # a short try of a long recipe: it runs
        print(f"note: --warmup_iters ({cfg.warmup_iters}) is longer than the run (--max_iters={cfg.max_iters}): "
              f"the learning rate only climbs to {get_lr(cfg.max_iters - 1, cfg):.2e}, not --learning_rate="
              f"{cfg.learning_rate:.2e}; pass --warmup_iters={cfg.max_iters // 10} to reach it")
    elif cfg.decay_lr and trains and last_lr > 1.01 * cfg.min_lr:
        print(f"note: the learning rate decays until --lr_decay_iters={cfg.lr_decay_iters}, but the run stops at "
              f"--max_iters={cfg.max_iters}, at {last_lr:.2e} (--min_lr={cfg.min_lr:.2e}); pass "
              f"--lr_decay_iters={cfg.max_iters} to decay over the whole run")


def trim_metrics(out_dir: str, iter_num: int):
    """On resume: the records of metrics.jsonl after the checkpoint's iteration (steps a crash or
    kill -9 lost after the last save, or the rest of a run resumed from its best checkpoint) move
    to metrics.before_resume.jsonl, so that the resumed run's records follow the checkpoint
    without a second copy of those iterations in the curve; the checkpoint's own evaluation stays."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:  # none yet
        return

    def kind(line: str) -> str:  # kept, later (than the checkpoint) or unreadable
        try:
            record = json.loads(line)
            it = record["iter"]
            if isinstance(it, bool) or not isinstance(it, (int, float)):
                return "unreadable"
        except (ValueError, KeyError, TypeError):  # a torn last line (kill -9 mid-write): aside too
            return "unreadable"
        return "kept" if it < iter_num or (it == iter_num and "val/loss" in record) else "later"
    kinds = [kind(line) for line in lines]
    if any(k != "kept" for k in kinds):
        aside = path.with_name("metrics.before_resume.jsonl")
        with open(aside, "a", encoding="utf-8") as f:  # first, so that a crash in between loses nothing
            f.write("".join(line + "\n" for line, k in zip(lines, kinds) if k != "kept"))
        durable.write_text(path, "".join(line + "\n" for line, k in zip(lines, kinds) if k == "kept"))
        later, unreadable = kinds.count("later"), kinds.count("unreadable")
        what = " and ".join(part for part in (
            f"{later} records after iteration {iter_num} (not in the checkpoint)" if later else "",
            f"{unreadable} unreadable line{'s' if unreadable > 1 else ''} (cut short or damaged)" if unreadable else "")
            if part)
        print(f"metrics.jsonl: {what} moved to {aside.name}; the resumed run writes its own")


def set_aside_metrics(out_dir: str):
    """A new run in a folder whose metrics.jsonl was left by a run that saved no checkpoint (killed
    before its first save): those records move to metrics.earlier.jsonl, not into this run's curve."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    aside = path.with_name("metrics.earlier.jsonl")
    try:
        if aside.exists():  # one more earlier run: its records after those already there
            durable.write_text(aside, aside.read_text(encoding="utf-8", errors="replace")
                               + path.read_text(encoding="utf-8", errors="replace"))
            path.unlink()
        else:
            durable.replace(path, aside)  # one rename: a crash leaves the file in one place or the other
    except OSError as e:
        raise UserError(f"cannot move {path} (an earlier run's, which saved no checkpoint) aside: "
                        f"{e.strerror or e}; move or delete it, or choose another --out_dir") from None
    print(f"metrics.jsonl of an earlier run here, which saved no checkpoint, moved to {aside.name}")


def seed_rngs(cfg: TrainConfig, procs: Processes, device_type: str) -> torch.Generator:
    """Seed the weights' initialization and dropout (torch's RNG), and return the generator of
    the training batches; each rank draws its own."""
    torch.manual_seed(cfg.seed + procs.rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    hardware.set_determinism(cfg.deterministic, device_type)  # --deterministic: GPUs only
    if cfg.deterministic and device_type == "cpu" and procs.master:
        print("note: --deterministic changes nothing on a CPU: an eager run is bit-reproducible already, and a "
              "compiled one (--compile) is with OMP_NUM_THREADS=1 (its kernels' threads add in varying order)")
    return torch.Generator().manual_seed(cfg.seed + procs.rank)


def build_model(cfg: TrainConfig, data: Dataset, tokenizer: dict, ckpt: dict | None, ckpt_path: Path,
                pretrained: Pretrained | None) -> tuple[GPT, dict]:
    """The model and its model_args: new, with a pretrained GPT-2's weights, or with the
    checkpoint's (its shape and vocabulary are the checkpoint's)."""
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    model_args.update(vocab_size=data.vocab_size, dropout=cfg.dropout)
    if pretrained is not None:
        model_args.update(vocab_size=pretrained.config.vocab_size)
    if ckpt is not None:
        model_args.update({k: ckpt["model_args"][k] for k in MODEL_KEYS + ("vocab_size",)})
        differ = tokenizer_mismatch(ckpt["tokenizer"], tokenizer) if "tokenizer" in ckpt else None  # open_dataset's
        if ckpt["model_args"]["vocab_size"] != data.vocab_size or differ:
            why = differ or (f"it was trained with vocab_size {ckpt['model_args']['vocab_size']}, dataset "
                             f"{cfg.dataset!r} has {data.vocab_size}")
            raise UserError(f"cannot resume {ckpt_path} on dataset {cfg.dataset!r}: {why}; resume on the dataset "
                            f"it was trained on")
    problems = GPTConfig(**model_args).problems()  # what needs the dataset to check: the bigram table's size
    if problems:
        raise UserError(f"cannot build this model on {cfg.dataset!r}: " + "; ".join(problems))
    if pretrained is not None:
        block_size = pretrained.config.block_size
        model_config = GPTConfig(**{**model_args, "block_size": block_size})
        if pretrained.ours:  # built again for this run's dropout
            model = GPT(model_config)
            model.load_state_dict(pretrained.ours[0].state_dict())
        else:
            model = hf_format.load_model(pretrained.folder, model_config)
        if cfg.block_size < block_size:
            model.crop_block_size(cfg.block_size)
    else:
        model = GPT(GPTConfig(**model_args))
    if cfg.lora_rank:  # before a resumed state is loaded: it holds the adapters
        width = min(min(m.in_features, m.out_features) for m in model.transformer.h.modules()
                    if isinstance(m, torch.nn.Linear))
        if cfg.lora_rank >= width:  # a full-rank update: more to train than the layers themselves
            raise UserError(f"--lora_rank={cfg.lora_rank} is not below the model's narrowest layer ({width}): "
                            f"LoRA adapts a layer through a few directions; try --lora_rank=8 (or finetune "
                            f"the whole model without --lora_rank)")
        lora.apply(model, lora.from_settings(cfg))
    model.grad_checkpoint = cfg.grad_checkpoint
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model, model_args


def make_optimizer(model: GPT, cfg: TrainConfig, precision: hardware.Precision):
    """The optimizer (model.configure_optimizer: AdamW, or Muon with AdamW) and the gradient
    scaler, which float16 needs and other dtypes leave disabled."""
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          precision.device_type, cfg.optimizer, cfg.head_lr_scale,
                                          cfg.embed_lr_scale)
    scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.dtype == "float16")
    return optimizer, scaler


def resume_state(ckpt: dict, optimizer, scaler, data_gen: torch.Generator, precision: hardware.Precision,
                 seed: int, procs: Processes, ckpt_path: Path, trains: bool = True) -> tuple[int, float]:
    """Take back what exact resume needs beyond the weights: the optimizer's and the scaler's
    state and the RNG states (resume_rng). Returns the iteration and best val loss reached."""
    optimizer.load_state_dict(ckpt["optimizer"])  # its state moves to the parameters' device
    if ckpt["scaler"]:  # empty when the saved run did not use float16: a fresh scaler starts
        scaler.load_state_dict(ckpt["scaler"])
    cuda_states = ckpt["rng"].get("cuda")
    if cuda_states and precision.device_type == "cuda" and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    resume_rng(ckpt, procs.rank, procs.world_size, ckpt["iter_num"], seed, data_gen, procs.master)
    was = ckpt.get("precision")
    if procs.master and was and (was["device"], was["dtype"]) != (precision.device, precision.dtype):
        print(f"note: {ckpt_path} was trained on {was['device']} in {was['dtype']}, this run continues on "
              f"{precision.device} in {precision.dtype}: the same state, but the numbers from here on "
              f"will not match an uninterrupted run bit for bit")
    elif (procs.master and trains and was and precision.device_type == "cpu" and was.get("threads") is not None
          and was["threads"] != torch.get_num_threads() and len(ckpt["rng"]["data"]) == procs.world_size):
        n = was["threads"]  # (another number of processes draws other batches anyway: said by resume_rng)
        print(f"note: {ckpt_path} was trained with {n} CPU thread{'s' if n != 1 else ''}, this run uses "
              f"{torch.get_num_threads()}: sums add in another order, so the numbers from here on will not match an "
              f"uninterrupted run bit for bit (set the environment variable OMP_NUM_THREADS to {n} to match it)")
    return ckpt["iter_num"], ckpt["best_val_loss"]


def wrap_model(model: GPT, cfg: TrainConfig, procs: Processes, precision: hardware.Precision):
    """The module the loop calls: compiled (--compile) and, under torchrun, wrapped in DDP."""
    if cfg.compile:
        if procs.master:
            print("compiling the model... (takes a minute)")
        model = torch.compile(model)
    if procs.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[procs.local_rank] if precision.device_type == "cuda" else None)
    return model


# ---------------------------------------------------------------------------- evaluation and checkpoints

@torch.no_grad()
def estimate_loss(model, data: Dataset, cfg: TrainConfig, precision: hardware.Precision, procs: Processes,
                  stop: StopRequest | None = None) -> dict | None:
    """Mean loss over eval_iters batches of each split (val only without eval_train). The
    batches come from their own generator, re-seeded every time: evaluations compare like
    with like, and they never move the training RNG (so exact resume holds). None when a stop
    was asked for meanwhile (one process: the ranks of torchrun must finish it together)."""
    out = {}
    model.eval()
    for i, split in enumerate(("train", "val")):
        if split == "train" and not cfg.eval_train:
            continue
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + i)
        losses = torch.zeros(cfg.eval_iters)
        for k in range(cfg.eval_iters):
            if stop is not None and stop.signum is not None and not procs.ddp:
                model.train()
                return None
            x, y, *positions = data.get_batch(split, cfg.batch_size, cfg.block_size, gen, precision.device)
            with precision.autocast():
                _, loss = model(x, y, positions=positions[0] if positions else None)
            losses[k] = loss.item()
        mean = losses.mean()
        if procs.ddp:  # every rank takes the same checkpoint decision from the same numbers
            torch.distributed.all_reduce(mean)
            mean /= procs.world_size
        out[split] = mean.item()
    model.train()
    return out


def save_checkpoint(path: Path, raw_model: GPT, optimizer, scaler, iter_num: int, best_val_loss: float,
                    run: dict, data_gen: torch.Generator, procs: Processes, train_seconds: float,
                    holds_best: bool = False, best_iter: int | None = None, eval_owed: bool = False,
                    val_loss: float | None = None):
    """Called on every rank (DDP gathers each rank's data-sampler state); rank 0 writes. run holds
    what stays the same all run long: model_args, config, tokenizer and precision; train_seconds
    is the training time spent so far (TimeBudget); holds_best: saved at an evaluation that
    improved the val loss (not at a stop), so --patience may keep it as the best model; best_iter:
    where the best val loss was measured (--patience's count goes on from there on resume);
    eval_owed: a stop dropped the evaluation due at iter_num, so the resumed run makes it;
    val_loss: this model's own val loss, where it was evaluated at iter_num (a model card says it
    where the checkpoint does not hold the run's best)."""
    if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
        raise UserError(f"the model holds NaN or inf at iteration {iter_num}; not saving it over "
                        f"{path}. Lower --learning_rate or use --dtype=float32")
    states = [(data_gen.get_state(), torch.get_rng_state())]  # this rank's batches and dropout
    if procs.ddp:
        states = [None] * procs.world_size
        torch.distributed.all_gather_object(states, (data_gen.get_state(), torch.get_rng_state()))
    if not procs.master:
        return
    on_cuda = run["precision"]["device"].startswith("cuda")
    checkpoint.save({
        **run,
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "iter_num": iter_num,
        "best_val_loss": best_val_loss,
        "holds_best": holds_best,
        "best_iter": iter_num if best_iter is None else best_iter,
        "train_seconds": train_seconds,
        "eval_owed": eval_owed,
        "val_loss": val_loss,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if on_cuda else [],
                "data": [data for data, _ in states],
                "torch_ranks": [rng for _, rng in states]},
    }, path)


# ---------------------------------------------------------------------------- main

def main(argv=None):
    # settings: a resumed run completes them from its checkpoint, so they are checked after that
    cfg, explicit = parse_config(TrainConfig, argv, prog="train.py", check=False)
    # SIGTERM while starting: the lock released, a new empty out_dir removed (the loop has its own)
    held_signal = errors.terminate_cleanly()
    # the lock on out_dir (and anything else held) is released however the run ends
    with contextlib.ExitStack() as held:
        held.callback(held_signal)
        held.enter_context(errors.stdout_may_close(
            f"training goes on, its lines dropped; {Path(cfg.out_dir) / 'metrics.jsonl'} holds them"))
        try:
            run(cfg, explicit, held)
        except RuntimeError as e:
            if "RANK" in os.environ and any(m in str(e) for m in PEER_LOST):  # (the lock goes with held)
                raise UserError(f"another process of this torchrun job is gone ({peer_lost_reason(e)}); "
                                f"what was saved in {cfg.out_dir} is intact: start the job again with "
                                f"--init_from=resume") from None
            if compiler_missing(e):  # (only torch.compile raises these: a resumed --compile run too)
                raise UserError(compile_failed(e)) from None
            raise


def compiler_missing(e: Exception) -> bool:
    return (type(e).__name__ in ("BackendCompilerFailed", "InductorError", "CppCompileError")
            and errors.build_failed(e))


def compile_failed(e: Exception) -> str:
    """--compile's kernels could not be built (no C++ compiler, a linker that trips on a space in
    the Python environment's path): one line for what torch says in hundreds."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    cause = next((line for line in lines if "Error:" in line or "error:" in line or "not find" in line),
                 lines[0] if lines else type(e).__name__)
    why = errors.space_in_python_path()
    space = f"; {why}: use a virtual environment in a folder without one" if why else ""
    return (f"--compile could not build the model's kernels ({cause[:200]}); train without --compile (the "
            f"same model, eager), or install a C++ compiler ({errors.CXX_HINT}){space}")


# what gloo says when another rank of the job died (killed, out of memory) in the middle of a collective
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost_reason(e: Exception) -> str:
    """gloo's words for a lost peer, in short: its first sentence, without its source file's
    "[.../pair.cc:537]" in front."""
    first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).splitlines() or [""])[0].strip())
    sentence = next((m.group(0) for m in re.finditer(r".*?(?:by peer|Broken pipe)\.?", first)), first)
    cut = sentence.rfind(" ", 0, 157)
    return sentence if len(sentence) <= 160 else sentence[:cut if cut > 0 else 157] + " ..."


def out_dir_lock(cfg: TrainConfig, held: contextlib.ExitStack) -> runlock.FolderLock:
    """One run per out_dir: rank 0 holds <out_dir>/train.lock until this run ends, however it ends."""
    other = "choose another --out_dir" + (f" (python eval.py --out_dir={errors.quoted(cfg.out_dir)} evaluates a "
                                          f"model without writing anything, in a folder it cannot write to as well)"
                                          if cfg.eval_only else "")
    lock = runlock.FolderLock(Path(cfg.out_dir) / "train.lock", f"--out_dir {cfg.out_dir}", other)
    held.callback(lock.release)
    return lock


def remove_if_empty(lock: runlock.FolderLock, folder: Path):
    """Let go of the lock, then remove the out_dir this run created if nothing was written there
    (a mistake found at the first step: out of memory, say)."""
    lock.release()
    try:
        folder.rmdir()  # only an empty folder goes
    except OSError:
        pass


def end_run(procs, stopped_by: int | None, say_done: bool, done: str):
    """After the loop, on every rank: leave the process group, then exit with the signal's code
    when a signal stopped the run, or say what the run did."""
    if procs.ddp:
        leave_process_group()
    if stopped_by is not None:
        sys.exit(128 + stopped_by)
    if say_done:
        print(done)


def run(cfg: TrainConfig, explicit: set, held: contextlib.ExitStack):
    procs = start_process_group(cfg, explicit)
    master = procs.master
    out_lock = out_dir_lock(cfg, held)
    ckpt_path, ckpt = Path(cfg.out_dir) / "ckpt.pt", None
    if cfg.init_from == "resume":
        lock_out_dir(out_lock, procs.ddp, master, create=False)  # before reading a checkpoint another run may write
        decided = cfg.device  # under torchrun: this rank's, from the checkpoint's (start_process_group)
        cfg, ckpt = resume_settings(cfg, explicit, ckpt_path)
        if procs.ddp:  # the saved device is rank 0's (cuda:0), or a one-process run's (auto)
            cfg.device = decided
        if (master and "seed" in explicit and cfg.seed != ckpt["config"].get("seed", cfg.seed)
                and len(ckpt["rng"]["data"]) == procs.world_size):  # (else resume_rng draws afresh from --seed)
            print(f"note: a resume continues the checkpoint's random streams (batches, dropout); --seed={cfg.seed} "
                  f"(it was {ckpt['config']['seed']}) changes only the batches that evaluate the model, so val "
                  f"losses from here compare less well with the earlier ones")
    problems = cfg.problems() + [p for p in [accumulation_problem(cfg, procs)] if p]
    if not cfg.lora_rank and (idle := [f"--{k}" for k in lora.SETTINGS[1:] if k in explicit]):
        problems.append(f"{', '.join(idle)} set{'s' if len(idle) == 1 else ''} LoRA adapters, which --lora_rank=0 "
                        f"leaves out: add --lora_rank=N (8, say) to train them, or drop {'it' if len(idle) == 1 else 'them'}")
    if problems:  # every invalid setting at once, before any work
        raise UserError("; ".join(problems))
    cfg, pretrained = pretrained_settings(cfg, explicit)
    accum = micro_steps(cfg, procs)

    # device, data, out_dir
    precision = hardware.resolve(cfg.device, cfg.dtype)
    device = precision.device
    if precision.device_type == "cpu":  # a step's activations reuse the last step's memory
        hardware.keep_freed_memory()
    data, tokenizer = open_dataset(cfg, pretrained)
    created = master and not Path(cfg.out_dir).exists()
    lock_out_dir(out_lock, procs.ddp, master, create=True,  # never over another run's model
                 keep=ckpt_path if cfg.init_from != "resume" else None,
                 eval_only_from=cfg.init_from if cfg.eval_only else None)
    if created:  # a run that fails before writing anything leaves no empty folder behind
        held.callback(remove_if_empty, out_lock, Path(cfg.out_dir))
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    if master:
        announce(cfg, precision, data, tokens_per_iter, ckpt["iter_num"] if ckpt is not None else 0)
        if precision.device_type == "cpu":  # built (once, into the user's cache) now, not inside step 0's time
            print(f"CPU training kernels: {cpu_kernels.kernels_used()}")

    # model and optimizer, new or as the checkpoint left them
    if ckpt is None and pretrained is None and (why := recipe_bigram_too_large(cfg, explicit, data.vocab_size)):
        raise UserError(why)
    data_gen = seed_rngs(cfg, procs, precision.device_type)
    raw_model, model_args = build_model(cfg, data, tokenizer, ckpt, ckpt_path, pretrained)
    raw_model.to(device)  # saved weights always come from this uncompiled module
    if master:
        announce_model(raw_model, cfg)
    optimizer, scaler = make_optimizer(raw_model, cfg, precision)
    iter_num, best_val_loss = 0, float("inf")
    resumed_best, resumed_best_iter = False, 0  # whether the checkpoint holds its run's best model, and where that was
    if ckpt is not None:
        iter_num, best_val_loss = resume_state(ckpt, optimizer, scaler, data_gen, precision, cfg.seed, procs,
                                               ckpt_path, trains=not cfg.eval_only)
        resumed_best = ckpt.get("holds_best", math.isfinite(best_val_loss))  # (older checkpoints: evaluated)
        resumed_best_iter = ckpt.get("best_iter", iter_num)
        if (changed := data_changed(ckpt, cfg, data)) and not cfg.eval_only and math.isfinite(best_val_loss):
            if master:  # a val loss of other text would keep every new model unsaved
                print(f"note: {changed}; its best val loss {best_val_loss:.4f} was measured on other text, so "
                      f"this run's best starts afresh: its first evaluation saves")
            best_val_loss, resumed_best = float("inf"), False
    eval_owed = ckpt is not None and ckpt.get("eval_owed", False)  # a stop dropped the evaluation at iter_num
    budget = TimeBudget(cfg, ckpt.get("train_seconds", 0.0) if ckpt else 0.0, precision, procs.ddp)
    if ckpt is not None and master and not cfg.eval_only:
        left = (f"; {budget.spent:.1f} s of --time_budget={cfg.time_budget:g} spent, "
                f"{max(0.0, cfg.time_budget - budget.spent):.1f} s left") if cfg.time_budget else ""
        was = (ckpt.get("config") or {}).get("time_budget") or 0
        if was and not cfg.time_budget:  # a budget run resumed without one: now by iterations
            left = (f"; it was a --time_budget={was:g} run ({budget.spent:.1f} s spent): --time_budget=0 trains "
                    f"on by iterations, to --max_iters={cfg.max_iters:,}")
        best = f", best val loss {best_val_loss:.4f}" if math.isfinite(best_val_loss) else ""
        print(f"resuming {ckpt_path} from iteration {iter_num:,}{best}{left}")
    if ckpt is not None and master and not cfg.eval_only and iter_num < cfg.max_iters and not budget.used_up:
        trim_metrics(cfg.out_dir, iter_num)  # only a resume that trains on: the rest keeps the record
    elif ckpt is None and master and not cfg.eval_only:
        set_aside_metrics(cfg.out_dir)
    # where the weights first came from (scratch, gpt2, a folder), kept through resumes for export's card
    started_from = cfg.init_from if ckpt is None else ckpt.get("started_from", (ckpt.get("config") or {}).get("init_from"))
    # the wandb run a resume continues: its own, in its own folder (not a copy's, nor an --eval_only's)
    wandb_run = (ckpt or {}).get("wandb_run") or {}
    wandb_id = wandb_run.get("id") if wandb_run.get("out_dir") == str(Path(cfg.out_dir).resolve()) else None
    ckpt = None  # free memory
    model = wrap_model(raw_model, cfg, procs, precision)
    run_info = {**run_description(cfg, model_args, tokenizer, data, precision),
                "started_from": None if started_from == "resume" else started_from}

    # --eval_only reads a run, it does not add to its record (metrics.jsonl, loss.png)
    wandb_run = start_wandb(cfg, None if cfg.eval_only else wandb_id) if master else None
    log = MetricsLog(None if cfg.eval_only else cfg.out_dir, wandb_run)
    run_info["wandb_run"] = {"id": wandb_run.id if wandb_run is not None else wandb_id,  # kept through resumes
                             "out_dir": str(Path(cfg.out_dir).resolve())}
    progress = Progress(iter_num, None if cfg.time_budget else cfg.max_iters, enabled=master)
    curve = LossCurve(cfg.out_dir, progress)
    patience = Patience(cfg.patience, resumed_best_iter)
    stop = StopRequest(procs.ddp, master and not cfg.eval_only)  # (--eval_only saves nothing)
    first_iter = iter_num  # where this run starts: 0, or the checkpoint's iteration
    # the evaluation at the checkpoint's iteration was made before it was saved (unless a stop dropped it)
    skip_eval_at = iter_num if cfg.init_from == "resume" and not cfg.eval_only and not eval_owed else None
    stopped_by = None  # the signal that stopped the run early
    saved, last_val = False, None  # whether this run wrote ckpt.pt; its last val loss
    # whether ckpt.pt holds the best model evaluated (saved at an improvement, not at a stop)
    holds_best = resumed_best
    t0, steps_timed = time.perf_counter(), 0
    try:
        while True:
            # learning rate (and Muon's momentum) at this iteration, or at the time spent (time_budget)
            lr = set_schedule(optimizer, schedule_iter(iter_num, budget.agree(), cfg), cfg)

            # evaluate and checkpoint, every eval_interval and after the last step
            last = iter_num >= cfg.max_iters or budget.used_up
            at_start = iter_num == 0 and not cfg.eval_at_start and not cfg.eval_only
            evaluate = (iter_num % cfg.eval_interval == 0 or last or cfg.eval_only) and iter_num != skip_eval_at \
                and not at_start
            losses = estimate_loss(model, data, cfg, precision, procs, None if cfg.eval_only else stop) \
                if evaluate else None
            dropped = evaluate and losses is None  # a stop cut the evaluation short: the stop below saves
            if evaluate and not dropped:
                improved = losses["val"] < best_val_loss
                best_val_loss, last_val = min(best_val_loss, losses["val"]), losses["val"]
                out_of_patience = patience.run_out(improved, iter_num) and not last
                if master:
                    report_eval(iter_num, losses, lr, log, progress)
                keep_every = cfg.always_save_checkpoint and not cfg.patience  # patience: ckpt.pt is the best
                if iter_num > 0 and (improved or keep_every) and not cfg.eval_only:
                    save_checkpoint(ckpt_path, raw_model, optimizer, scaler, iter_num, best_val_loss, run_info,
                                    data_gen, procs, budget.spent, holds_best=improved, best_iter=patience.best_iter,
                                    val_loss=last_val)
                    saved, holds_best = True, improved
                    if master:
                        progress.write(f"saved checkpoint to {ckpt_path}")
                if out_of_patience:
                    last = True
                    if master:
                        spent = (f", {budget.spent:.1f} s of its --time_budget={cfg.time_budget:g} spent"
                                 if cfg.time_budget else "")
                        report_patience(cfg.patience, iter_num, ckpt_path, best_val_loss, patience.best_iter, progress,
                                        spent)
                if master and not cfg.eval_only:  # the curve after the checkpoint: a crash while drawing loses nothing
                    curve.draw(now=last)
                t0, steps_timed = time.perf_counter(), 0  # keep eval out of the throughput figures
            if last and master and not dropped and not cfg.eval_only:  # how the run ended, by its budget
                if budget.used_up:
                    progress.write(f"time budget spent: {iter_num:,} iterations in {budget.spent:.1f} s of "
                                   f"training (--time_budget={cfg.time_budget:g})")
                elif cfg.time_budget and iter_num >= cfg.max_iters:  # the schedule follows the budget: unfinished
                    share = budget.spent / cfg.time_budget
                    at = share * cfg.lr_decay_iters  # where the schedule stood
                    unfinished = ("its warmup unfinished and its decay not started" if at < cfg.warmup_iters else
                                  "its decay not started" if cfg.lr_schedule == "wsd" and
                                  at < (1 - cfg.warmdown_frac) * cfg.lr_decay_iters else "its decay unfinished")
                    schedule = (f"the learning rate follows the budget, so it stood at {lr:.2e}, {unfinished}: "
                                if cfg.decay_lr else "")
                    progress.write(f"note: --max_iters={cfg.max_iters} ended this run after {budget.spent:.1f} s of "
                                   f"its --time_budget={cfg.time_budget:g} ({share:.0%}); {schedule}give the time "
                                   f"the run takes, or a higher --max_iters")
            if (last or cfg.eval_only) and not dropped:
                break
            if stop.requested(procs.ddp, device):  # Ctrl-C or SIGTERM: save, say how to resume, leave
                # with patience ckpt.pt holds the best model and stays, once there is one (a
                # checkpoint of an earlier stop is no best: it is replaced, and the progress kept)
                keep_best = cfg.patience and holds_best
                if not keep_best:
                    save_checkpoint(ckpt_path, raw_model, optimizer, scaler, iter_num, best_val_loss, run_info,
                                    data_gen, procs, budget.spent, best_iter=patience.best_iter, eval_owed=dropped,
                                    val_loss=last_val if evaluate and not dropped else None)
                    saved = True
                if master:
                    report_stop(stop.signum, iter_num, ckpt_path, progress, curve,
                                patience.best_iter if keep_best else None)
                stopped_by = stop.signum
                break

            # forward, backward, clip, update
            budget.start()
            batches = [data.get_batch("train", cfg.batch_size, cfg.block_size, data_gen, device)
                       for _ in range(accum)]
            loss, grad_norm = train_step(model, optimizer, scaler, batches, precision, cfg.grad_clip, procs.ddp)
            if not torch.isfinite(grad_norm):  # the step was not taken
                report_skipped_step(iter_num, scaler, cfg.out_dir, progress, master)

            # timing and logging (loss.item() waits for the device, so only every log_interval)
            record = None
            steps_timed += 1
            if iter_num % cfg.log_interval == 0 and master:
                record = step_record(iter_num, loss, lr, precision, t0, steps_timed, tokens_per_iter, budget, cfg)
                log.log(record)
                t0, steps_timed = time.perf_counter(), 0
            progress.step(record)
            budget.stop()
            iter_num += 1
    finally:
        stop.restore()
        progress.close()
    done = f"done: {iter_num} iterations, best val loss {best_val_loss:.4f}, checkpoint in {ckpt_path}"
    if saved and not holds_best and last_val is not None and last_val > best_val_loss:  # --always_save_checkpoint
        done += (f" (the last model, val loss {last_val:.4f}: every evaluation saves; "
                 f"--always_save_checkpoint=false keeps the best)")
    if iter_num == first_iter and not saved:  # nothing trained: nothing to save
        if master and not cfg.eval_only and cfg.init_from == "resume":
            curve.draw(now=True)  # the curve of the run as it stands (a run killed after a save left an older one)
        done = (("done: nothing to train, the time budget is spent (raise --time_budget to go on)" if budget.used_up
                 else f"done: nothing to train, the checkpoint is already at iteration {iter_num} (raise "
                      f"--max_iters above it to go on)") if cfg.init_from == "resume" else
                "done: --max_iters=0, nothing trained or saved (--eval_only=True evaluates a model)")
    elif not saved and stopped_by is None and not cfg.eval_only and cfg.init_from == "resume":
        # always_save_checkpoint=false: ckpt.pt keeps the checkpoint's best model, not this run's work
        done = (f"done: {iter_num} iterations; the val loss ({last_val:.4f} at the end) never went below the "
                f"checkpoint's best {best_val_loss:.4f}, so {ckpt_path} still holds iteration {first_iter}'s "
                f"model and iterations {first_iter + 1}-{iter_num} were not saved" +
                (" (with --patience ckpt.pt keeps the best model)" if cfg.patience else
                 " (--always_save_checkpoint=true keeps the last model)")) if last_val is not None else done
    elif not saved and stopped_by is None and not cfg.eval_only and cfg.init_from != "resume":
        # the val loss never beat the first evaluation's (the start, never saved): a run that ends
        # without a checkpoint would leave nothing to sample or resume, so the last model is kept
        save_checkpoint(ckpt_path, raw_model, optimizer, scaler, iter_num, best_val_loss, run_info,
                        data_gen, procs, budget.spent, best_iter=patience.best_iter, val_loss=last_val)
        done = (f"done: {iter_num} iterations; the val loss ({last_val:.4f} at the end) never went below the "
                f"first evaluation's {best_val_loss:.4f}, so ckpt.pt holds the last model, in {ckpt_path} "
                f"(a lower --learning_rate or a longer run may do better)")
    log.finish()
    end_run(procs, stopped_by, master and not cfg.eval_only, done)


def exit_rank():
    """How a torchrun rank process ends, with main's exit code: flush, then os._exit, which skips
    the interpreter's teardown. DDP leaves references to the gloo process group that nothing can
    drop (even a bare DistributedDataParallel(nn.Linear), deleted, keeps its gloo and TCPStore
    threads alive after destroy_process_group and gc), so those threads meet the interpreter's
    finalization, where a rank process can die with SIGABRT ("terminate called without an
    active exception"), failing a finished run. By then everything is saved and the
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
