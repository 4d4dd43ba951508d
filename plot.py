"""Loss curves from <out_dir>/metrics.jsonl: one run, or several overlaid to compare them.

    python plot.py out-shakespeare-char                   # -> out-shakespeare-char/loss.png
    python plot.py out-a out-b out-c --output=compare.png

train.py calls write_loss_png() at every evaluation and at the end, so each run keeps an
up-to-date <out_dir>/loss.png; app.py shows it beside the model.

metrics.jsonl holds two kinds of records (see train.py): a step record every log_interval
({"iter", "train/loss", "lr", "tokens_per_sec", "step_ms"}: the loss of one batch) and an
evaluation record ({"iter", "train/loss", "val/loss", "lr"}: means over eval_iters batches).
A resumed run appends again from its checkpoint's iteration, so an iteration can appear more
than once: the last record of each kind wins, since it belongs to the run that went on.

matplotlib is imported inside the drawing function (Agg, no display needed), so importing
this module costs train.py nothing at startup; figures are built without pyplot, which keeps
no global state and is safe from a web server's threads.
"""
import errors
errors.starting(__name__)  # a missing requirement: one line, no traceback
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import durable
from config import parse_config
from errors import UserError, run_main


@dataclass
class PlotConfig:
    """Settings of plot.py; the run folders (OUT_DIR ...) come first, without a --key."""
    output: str = ""  # PNG to write; default: OUT_DIR/loss.png for one run, loss_curves.png here for several
    title: str = ""  # figure title; default: the run folder's name, or "N runs"
    ymax: float = 0.0  # top of the loss axis, to see the end of a run the first steps' loss dwarfs; 0 = all of it
    log_y: bool = False  # a logarithmic loss axis


@dataclass
class Run:
    """The curves of one run, one value per iteration, sorted by iteration."""
    name: str
    steps: list[tuple[int, float]]  # (iter, loss of one training batch)
    train: list[tuple[int, float]]  # (iter, mean train loss at an evaluation)
    val: list[tuple[int, float]]  # (iter, mean val loss at an evaluation)
    lr: list[tuple[int, float]]  # (iter, learning rate)
    skipped: list[str] = dataclasses.field(default_factory=list)  # what was wrong with each record left out

    def skipped_note(self, path) -> str | None:
        """One line on the records left out, or None."""
        if not self.skipped:
            return None
        n = len(self.skipped)
        return f"note: {path}: skipped {n} malformed record{'s' if n > 1 else ''} ({self.skipped[0]}); drew the rest"

    def best_val(self) -> tuple[int, float] | None:
        """(iter, loss) of the lowest val loss; the first one on a tie."""
        return min(self.val, key=lambda p: p[1]) if self.val else None


CURVES = ("train/loss", "val/loss", "lr")  # the values plotted


def read_run(out_dir, name: str | None = None) -> Run:
    """The curves in <out_dir>/metrics.jsonl; a torn last line (a run killed mid-write) is skipped,
    and so is a record whose loss or lr is not a number (Run.skipped says which): one bad value
    (an edited file) costs its point, not the whole plot."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {out_dir}; train.py writes it there, so point at a run's --out_dir")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    steps, evals = {}, {}  # iter -> record; a later record of the same iter replaces an earlier one
    skipped = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            it = int(record["iter"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                continue  # the last line of a run killed while writing it
            raise UserError(f"{path} line {n} is not a metrics record; was the file edited?") from None
        bad = [k for k in CURVES if k in record and not is_number(record[k])]
        if bad:
            skipped.append(f"first at line {n}: {json.dumps(bad[0])} is {json.dumps(record[bad[0]])[:40]}, not a number")
            continue
        (evals if "val/loss" in record else steps)[it] = record

    def curve(records: dict, key: str) -> list[tuple[int, float]]:
        points = [(it, float(r[key])) for it, r in sorted(records.items()) if key in r]
        return [(it, v) for it, v in points if math.isfinite(v)]

    lr = {**evals, **steps}  # both kinds carry the lr of their iteration
    return Run(name=name or Path(out_dir).resolve().name, steps=curve(steps, "train/loss"),
               train=curve(evals, "train/loss"), val=curve(evals, "val/loss"), lr=curve(lr, "lr"), skipped=skipped)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is no loss


def draw(runs: list[Run], title: str = "", ymax: float = 0.0, log_y: bool = False):
    """A matplotlib Figure of the runs' loss curves. One run: its batch losses (faint), the
    evaluated train and val losses, the best val marked, and the learning rate on a second
    axis. Several runs: one colour each, val solid and batch losses faint, no lr (too busy)."""
    from matplotlib.figure import Figure  # lazily: train.py starts without matplotlib
    from matplotlib.ticker import MaxNLocator

    single = len(runs) == 1
    # the legend goes below the axes, in rows of 3 (one run: 5 entries) or 2 (3 per run); the
    # figure grows with it. Fixed margins: a layout engine would double the drawing time.
    ncols = 3 if single else 2
    legend_rows = 2 if single else math.ceil(3 * len(runs) / ncols)
    legend_inches = 0.19 * legend_rows + 0.1
    height = 4.4 + legend_inches
    fig = Figure(figsize=(8, height), dpi=100)
    fig.subplots_adjust(left=0.09, right=0.9 if single else 0.97, top=1 - 0.35 / height,
                        bottom=(0.55 + legend_inches) / height)
    ax = fig.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
              "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    for i, run in enumerate(runs):
        c_train = colors[0] if single else colors[i % len(colors)]
        c_val = colors[1] if single else c_train
        prefix = "" if single else f"{run.name}: "
        if run.steps:
            x, y = zip(*run.steps)
            ax.plot(x, y, color=c_train, alpha=0.3, linewidth=0.8, label=f"{prefix}train loss (one batch)")
        if run.train and single:  # with several runs, the eval train loss would double the lines
            x, y = zip(*run.train)
            ax.plot(x, y, color=c_train, marker="o", markersize=3, linewidth=1.5, label="train loss (eval)")
        if run.val:
            x, y = zip(*run.val)
            ax.plot(x, y, color=c_val, marker="o", markersize=3, linewidth=1.8, label=f"{prefix}val loss")
        best = run.best_val()
        if best is not None:
            ax.plot(*best, marker="*", markersize=14, color=c_val, markeredgecolor="black",
                    linestyle="none", label=f"{prefix}best val {best[1]:.4f} at iter {best[0]:,}")
    if log_y:
        ax.set_yscale("log")
    if ymax > 0:
        ax.set_ylim(top=ymax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (cross-entropy, nats/token)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if single and runs[0].lr:
        ax2 = ax.twinx()
        x, y = zip(*runs[0].lr)
        line, = ax2.plot(x, y, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:gray")
        ax2.tick_params(axis="y", colors="tab:gray")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax2.set_ylim(bottom=0)
        handles, labels = handles + [line], labels + ["learning rate"]
    if not any(r.steps or r.val for r in runs):
        ax.text(0.5, 0.5, "no losses logged yet", transform=ax.transAxes, ha="center", va="center")
    if handles:  # below the axes: never on top of a curve
        fig.legend(handles, labels, loc="lower center", ncols=ncols, fontsize="small",
                   frameon=False)
    ax.set_title(title or (runs[0].name if single else f"{len(runs)} runs"))
    return fig


def save_png(fig, path) -> None:
    """Write fig as a PNG atomically: a temp file in the same folder, fsync, then rename,
    so a reader (app.py, an image viewer) never sees half a file."""
    path = Path(path)
    try:
        with durable.replacing(path) as f:
            fig.savefig(f, format="png")
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror}; choose another --output or free some disk space") from None


def write_loss_png(out_dir) -> Path:
    """<out_dir>/loss.png from <out_dir>/metrics.jsonl (train.py calls this at every evaluation)."""
    path = Path(out_dir) / "loss.png"
    save_png(draw([read_run(out_dir)]), path)
    return path


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(run folders, --key=value flags); `--key value` keeps its value with the flag."""
    folders, flags = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            if "=" not in arg and arg.lstrip("-").replace("-", "_") in PlotConfig.__dataclass_fields__ \
                    and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            folders.append(arg)
        i += 1
    return folders, flags


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    folders, flags = split_args(argv)
    cfg, _ = parse_config(PlotConfig, flags, prog="plot.py")
    if not folders:
        raise UserError("name at least one run folder: python plot.py OUT_DIR [OUT_DIR ...] [--output=FILE]")
    runs = [read_run(folder) for folder in folders]
    for folder, run in zip(folders, runs):
        if note := run.skipped_note(Path(folder) / "metrics.jsonl"):
            print(note, file=sys.stderr)
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # two runs named out/ in different places: tell them apart
        if names.count(run.name) > 1:
            run.name = str(Path(folders[i]))
    output = cfg.output or (Path(folders[0]) / "loss.png" if len(runs) == 1 else "loss_curves.png")
    if Path(output).suffix.lower() != ".png":
        raise UserError(f"--output must end in .png, got {output!r}")
    if not Path(output).resolve().parent.is_dir():
        raise UserError(f"the folder of --output={output} does not exist; create it first")
    if not math.isfinite(cfg.ymax) or cfg.ymax < 0:
        raise UserError(f"--ymax must be a positive number (0 = the whole range), got {cfg.ymax}")
    lowest = min((y for r in runs for _, y in r.steps + r.val + r.train), default=None)
    if cfg.ymax and lowest is not None and cfg.ymax < lowest:
        print(f"note: --ymax={cfg.ymax:g} is below every loss drawn (the lowest is {lowest:.4f}): the figure is empty",
              file=sys.stderr)
    save_png(draw(runs, cfg.title, cfg.ymax, cfg.log_y), output)
    for run in runs:
        best = run.best_val()
        best_text = f"best val {best[1]:.4f} at iter {best[0]}" if best else "no evaluation yet"
        last = max([it for it, _ in run.steps + run.val], default=0)
        print(f"{run.name}: {last} iterations, {best_text}")
    print(f"wrote {output}")


if __name__ == "__main__":
    run_main(main)
