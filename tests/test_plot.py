"""plot.py and the loss.png train.py draws: runs with and without a resume, overlays, torn files."""
import json
import shutil

import pytest

import plot
import train
from conftest import TINY, write_char_dataset
from errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def is_figure(path) -> bool:
    """A PNG 800 pixels wide and a little over 400 high (the legend adds height for more runs)."""
    data = path.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return data[:8] == PNG and width == 800 and 400 < height < 700


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_text):
    """'plain': 8 iterations in one go. 'resumed': 4 iterations, then 4 more; after those the
    checkpoint of iteration 4 is put back (as if the run died between checkpoints) and the
    run resumed again with another learning rate, so iterations 4..8 are logged twice."""
    root = tmp_path_factory.mktemp("plot")
    write_char_dataset(root / "data", shakespeare_text[:30_000])

    def run(name, *flags):
        train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / name}", *TINY, "--eval_interval=4",
                    "--decay_lr=false", *flags])

    run("plain", "--max_iters=8")
    run("resumed", "--max_iters=4")
    shutil.copy(root / "resumed" / "ckpt.pt", root / "ckpt-4.pt")
    run("resumed", "--max_iters=8", "--init_from=resume")
    first_png = (root / "resumed" / "loss.png").read_bytes()
    shutil.copy(root / "ckpt-4.pt", root / "resumed" / "ckpt.pt")
    run("resumed", "--max_iters=8", "--init_from=resume", "--learning_rate=1e-3")
    return root, first_png


def test_train_draws_loss_png(runs):
    root, _ = runs
    assert is_figure(root / "plain" / "loss.png")
    run = plot.read_run(root / "plain")
    assert [it for it, _ in run.val] == [0, 4, 8] and [it for it, _ in run.train] == [0, 4, 8]
    assert [it for it, _ in run.steps] == list(range(8))
    assert run.best_val() == min(run.val, key=lambda p: p[1])
    assert not list((root / "plain").glob(".loss.png.tmp-*"))  # the atomic write left nothing behind


def test_after_a_resume_each_iteration_is_logged_once_and_the_last_record_wins(runs, tmp_path):
    root, first_png = runs
    lines = (root / "resumed" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line)["iter"] for line in lines]
    assert logged.count(5) == 1 and logged.count(8) == 1  # the lost continuation's records moved aside
    aside = (root / "resumed" / "metrics.before_resume.jsonl").read_text().splitlines()
    assert {json.loads(line)["iter"] for line in aside} == {4, 5, 6, 7, 8}
    run = plot.read_run(root / "resumed")
    assert [it for it, _ in run.steps] == list(range(8)) and [it for it, _ in run.val] == [0, 4, 8]
    lr = dict(run.lr)
    assert lr[3] == 6e-4 and lr[5] == 1e-3 and lr[8] == 1e-3  # the second resume's records
    assert (root / "resumed" / "loss.png").read_bytes() != first_png  # redrawn by the last run
    # a log with both continuations in it (written before resumes moved the lost one aside):
    # the last record of an iteration wins
    before = [line for line in lines if json.loads(line)["iter"] < 4 or (json.loads(line)["iter"] == 4 and
                                                                        "val/loss" in json.loads(line))]
    (tmp_path / "metrics.jsonl").write_text("\n".join(before + aside + lines[len(before):]) + "\n")
    both = plot.read_run(tmp_path)
    assert (both.steps, both.val, both.lr) == (run.steps, run.val, run.lr)


def test_plot_cli_overlays_runs(runs, capsys):
    root, _ = runs
    out = root / "compare.png"
    plot.main([str(root / "plain"), str(root / "resumed"), f"--output={out}", "--title=two runs"])
    printed = capsys.readouterr().out
    assert "plain: 8 iterations, best val" in printed and "resumed: 8 iterations" in printed
    assert is_figure(out)
    (root / "plain" / "loss.png").unlink()
    plot.main([str(root / "plain")])  # one run: its own loss.png, drawn again
    assert is_figure(root / "plain" / "loss.png")
    assert f"wrote {root / 'plain' / 'loss.png'}" in capsys.readouterr().out


def test_torn_last_line_is_skipped_and_a_bad_middle_line_refused(tmp_path):
    records = [{"iter": 0, "train/loss": 4.0, "val/loss": 4.1, "lr": 1e-3},
               {"iter": 0, "train/loss": 4.2, "lr": 1e-3, "tokens_per_sec": 1.0, "step_ms": 1.0},
               {"iter": 1, "train/loss": 3.9, "lr": 1e-3, "tokens_per_sec": 1.0, "step_ms": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + '{"iter": 2, "train/lo')  # killed mid-write
    run = plot.read_run(tmp_path)
    assert run.steps == [(0, 4.2), (1, 3.9)] and run.val == [(0, 4.1)] and run.train == [(0, 4.0)]
    plot.write_loss_png(tmp_path)
    assert is_figure(tmp_path / "loss.png")
    (tmp_path / "metrics.jsonl").write_text("garbage\n" + text)
    with pytest.raises(UserError, match="line 1 is not a metrics record"):
        plot.read_run(tmp_path)


def test_records_with_a_value_that_is_no_number_are_skipped_with_one_note(tmp_path, capsys):
    lines = ['{"iter": 0, "train/loss": 4.0, "val/loss": 4.1, "lr": 0.001}', '{"iter": 1, "train/loss": "x"}',
             '{"iter": 2, "train/loss": 3.5, "lr": 0.001}', '{"iter": 3, "lr": null}', '{"iter": 4, "train/loss": 3.2}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    plot.main([str(tmp_path)])
    out, err = capsys.readouterr()
    assert err == (f'note: {tmp_path / "metrics.jsonl"}: skipped 2 malformed records (first at line 2: "train/loss" '
                   f'is "x", not a number); drew the rest\n')
    assert "4 iterations, best val 4.1000 at iter 0" in out and is_figure(tmp_path / "loss.png")
    assert plot.read_run(tmp_path).steps == [(2, 3.5), (4, 3.2)]


def test_an_empty_log_still_draws(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    plot.write_loss_png(tmp_path)
    assert is_figure(tmp_path / "loss.png")


def test_frequent_evaluations_draw_at_most_a_twentieth_of_the_time(monkeypatch, tmp_path):
    """A drawing of 0.5 s and evaluations 0.1 s apart: the curve is redrawn only once 20 times a
    drawing's duration has passed since the last began, so drawing is at most 5% of the run;
    a drawing asked for now (the last evaluation, a stop) always comes."""
    import types
    clock, drawn = [0.0], []

    def draw(out_dir):
        drawn.append(clock[0])
        clock[0] += 0.5

    monkeypatch.setattr(train.plot, "write_loss_png", draw)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "train/loss": 4.0}\n')  # (none: nothing to draw)
    curve = train.LossCurve(str(tmp_path), progress=None)
    for _ in range(200):
        curve.draw()
        clock[0] += 0.1
    assert len(drawn) == 3 and all(b - a >= 20 * 0.5 for a, b in zip(drawn, drawn[1:])), drawn
    assert 0.5 * len(drawn) <= 0.05 * clock[0] + 0.5  # 5% of the run, and the first drawing
    curve.draw(now=True)
    assert len(drawn) == 4 and drawn[-1] == clock[0] - 0.5


def write_metrics(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


EVALS_AND_STEPS = [{"iter": 0, "train/loss": 4.0, "val/loss": 4.2, "lr": 1e-3},
                   {"iter": 0, "train/loss": 4.3, "lr": 1e-3, "tokens_per_sec": 1.0, "step_ms": 1.0},
                   {"iter": 1, "train/loss": 3.9, "lr": 1e-3, "tokens_per_sec": 1.0, "step_ms": 1.0},
                   {"iter": 2, "train/loss": 3.0, "val/loss": 3.1, "lr": 8e-4},
                   {"iter": 3, "train/loss": 2.9, "lr": 6e-4, "tokens_per_sec": 1.0, "step_ms": 1.0},
                   {"iter": 4, "train/loss": 2.5, "val/loss": 3.1, "lr": 5e-4}]  # the best val tied at 2 and 4


def lines_of(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_one_runs_figure_draws_each_curve_whole_and_apart_and_marks_the_first_best_val(tmp_path):
    write_metrics(tmp_path / "run", EVALS_AND_STEPS)
    run = plot.read_run(tmp_path / "run")
    assert run.best_val() == (2, 3.1)  # the first of a tie
    fig = plot.draw([run])
    lines = lines_of(fig.axes[0])
    points = {label: (list(line.get_xdata()), list(line.get_ydata())) for label, line in lines.items()}
    assert points["train loss (one batch)"] == ([0, 1, 3], [4.3, 3.9, 2.9])
    assert points["train loss (eval)"] == ([0, 2, 4], [4.0, 3.0, 2.5])
    assert points["val loss"] == ([0, 2, 4], [4.2, 3.1, 3.1])
    assert points["best val 3.1000 at iter 2"] == ([2], [3.1])
    val_colour = lines["val loss"].get_color()
    assert lines["best val 3.1000 at iter 2"].get_color() == val_colour
    assert val_colour != lines["train loss (eval)"].get_color()  # train and val are told apart
    lr, = fig.axes[1].get_lines()
    assert (list(lr.get_xdata()), list(lr.get_ydata())) == ([0, 1, 2, 3, 4], [1e-3, 1e-3, 8e-4, 6e-4, 5e-4])


def test_several_runs_get_a_colour_each_and_two_runs_of_one_name_are_told_apart(tmp_path, capsys):
    write_metrics(tmp_path / "a" / "out", EVALS_AND_STEPS)
    write_metrics(tmp_path / "b" / "out", EVALS_AND_STEPS[:3])
    runs = [plot.read_run(tmp_path / "a" / "out", "a"), plot.read_run(tmp_path / "b" / "out", "b")]
    lines = lines_of(plot.draw(runs).axes[0])
    assert set(lines) == {"a: train loss (one batch)", "a: val loss", "a: best val 3.1000 at iter 2",
                          "b: train loss (one batch)", "b: val loss", "b: best val 4.2000 at iter 0"}
    assert lines["a: val loss"].get_color() != lines["b: val loss"].get_color()
    assert list(lines["b: val loss"].get_xdata()) == [0]
    out = tmp_path / "both.png"
    plot.main([str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out"), f"--output={out}"])
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'a' / 'out'}: 4 iterations, best val 3.1000 at iter 2" in printed
    assert f"{tmp_path / 'b' / 'out'}: 1 iterations, best val 4.2000 at iter 0" in printed
    assert is_figure(out)


def test_ymax_and_log_y_zoom_the_loss_axis(tmp_path, capsys):
    """A run whose first loss (4.2) dwarfs its end (0.4-0.6): --ymax cuts the axis there, --log_y
    makes it logarithmic; the default shows every point; a negative --ymax is refused."""
    write_metrics(tmp_path / "run", EVALS_AND_STEPS)
    run = plot.read_run(tmp_path / "run")
    assert plot.draw([run]).axes[0].get_ylim()[1] > 4.3
    assert plot.draw([run], ymax=3.2).axes[0].get_ylim()[1] == 3.2
    assert plot.draw([run], log_y=True).axes[0].get_yscale() == "log"
    plot.main([str(tmp_path / "run"), "--ymax=3.5", f"--output={tmp_path / 'z.png'}"])
    assert (tmp_path / "z.png").stat().st_size > 1000
    for bad in ("-1", "inf", "nan"):
        with pytest.raises(UserError, match="--ymax must be a positive number"):
            plot.main([str(tmp_path / "run"), f"--ymax={bad}"])
    capsys.readouterr()
    plot.main([str(tmp_path / "run"), "--ymax=1", f"--output={tmp_path / 'z.png'}"])
    assert "note: --ymax=1 is below every loss drawn (the lowest is 2.5000)" in capsys.readouterr().err
