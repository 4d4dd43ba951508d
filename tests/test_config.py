"""The configuration system shared by train.py, sample.py and bench.py."""
import re
from pathlib import Path

import pytest

from config import parse_config
from errors import UserError
from training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def test_there_are_configs():
    assert {"shakespeare.py", "shakespeare_cpu.py", "shakespeare_bpe.py"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg, explicit = parse_config(TrainConfig, [str(path)])
    assert explicit  # each recipe changes something
    assert not cfg.problems()


@pytest.mark.parametrize("bf16_units", [True, False], ids=["bf16-cpu", "float32-cpu"])
def test_5min_speedrun_takes_the_settings_of_its_cpu_kind(monkeypatch, bf16_units):
    """AMX and AVX512-BF16 CPUs buy enough steps to overfit: windows of 128, batch 32, a little
    dropout; a float32 CPU (AVX2) keeps block 64, batch 48, none, and warms down longer. Either way the final evaluation
    reads about the whole val split (111,540 tokens) and the budget leaves 30 s of the 300."""
    import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: bf16_units)
    cfg, _ = parse_config(TrainConfig, [str(ROOT / "configs" / "shakespeare_5min.py")])
    want = (32, 128, 0.05, 0.5) if bf16_units else (48, 64, 0.0, 0.7)
    assert (cfg.batch_size, cfg.block_size, cfg.dropout, cfg.warmdown_frac) == want
    assert 111_540 <= cfg.eval_iters * cfg.batch_size * cfg.block_size < 111_540 + cfg.batch_size * cfg.block_size
    assert cfg.time_budget == 270 and cfg.max_iters > 100_000


def test_shakespeare_recipe_is_the_classic_one():
    cfg, _ = parse_config(TrainConfig, [str(ROOT / "configs" / "shakespeare.py")])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (6, 6, 384, 256)
    assert (cfg.dropout, cfg.learning_rate, cfg.max_iters) == (0.2, 1e-3, 5000)
    assert cfg.out_dir == "out-shakespeare-char" and cfg.dataset == "shakespeare_char"


def test_flags_override_file_in_both_spellings(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nbatch_size = 7\nlearning_rate = math.sqrt(4) * 1e-3\n_private = 3\n")
    cfg, explicit = parse_config(TrainConfig, [str(f), "--batch_size=9", "--n_layer", "3", "--compile",
                                               "--bias", "false", "--max_iters=5e3"])
    assert (cfg.batch_size, cfg.n_layer, cfg.compile, cfg.bias, cfg.max_iters) == (9, 3, True, False, 5000)
    assert cfg.learning_rate == 2e-3
    assert explicit == {"batch_size", "learning_rate", "n_layer", "compile", "bias", "max_iters"}


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match=r"unknown setting 'batchsize' \(did you mean --batch_size\?\)"):
        parse_config(TrainConfig, ["--batchsize=3"])


def test_nanogpt_names_and_files_point_to_theirs_here(tmp_path):
    """A nanoGPT habit gets this project's name for it: --start (difflib said --stats), its
    config/train_shakespeare_char.py; a key misspelt in a config file names the file."""
    import sample
    with pytest.raises(UserError, match=r"^unknown setting 'start' \(nanoGPT's --start is --prompt here\); see --help$"):
        parse_config(sample.SampleConfig, ["--start=ROMEO:"])
    with pytest.raises(UserError, match=r"config file config/train_shakespeare_char.py not found; did you mean "
                                        r".*configs[/\\]shakespeare.py\?$"):
        parse_config(TrainConfig, ["config/train_shakespeare_char.py"])
    mine = tmp_path / "mine.py"
    mine.write_text("n_embed = 64\nn_layer = 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^unknown setting 'n_embed' in {re.escape(str(mine))} \(did you mean --n_embd\?\)"):
        parse_config(TrainConfig, [str(mine), "--n_layer=3"])
    with pytest.raises(UserError, match=r"^unknown setting 'n_embed' \(did you"):  # a flag: no file to name
        parse_config(TrainConfig, ["--n_embed=64"])


def test_a_setting_a_script_no_longer_has_says_where_its_job_went():
    import bench
    with pytest.raises(UserError, match=r"--quant_eval is gone: .*python eval.py --out_dir=OUT_DIR --int8"):
        parse_config(bench.BenchConfig, ["--quant_eval=out"])
    with pytest.raises(UserError, match="unknown setting 'quant_eval'"):  # train.py never had it
        parse_config(TrainConfig, ["--quant_eval=out"])


def test_all_problems_reported_at_once():
    with pytest.raises(UserError) as e:
        parse_config(TrainConfig, ["--batch_size=zero", "--n_layer=0", "--dropout=1.5", "--compile=maybe",
                                   "--warmup_iters=-1"])
    msg = str(e.value)
    for part in ["--batch_size must be an integer", "--n_layer must be at least 1", "--dropout must be in",
                 "--compile must be true or false", "--warmup_iters must be >= 0"]:
        assert part in msg
    assert "\n" not in msg


@pytest.mark.parametrize("flag, message", [
    ("--learning_rate=nan", "--learning_rate must be a finite number"),
    ("--max_iters=1.5", "--max_iters must be an integer"),
    ("--batch_size", "--batch_size needs a value"),
    ("--init_from=gpt7", "--init_from must be scratch or resume"),
    ("--n_head=5", "must be divisible by --n_head"),
])
def test_bad_values(flag, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(TrainConfig, [flag])


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_config(TrainConfig, [str(tmp_path / "missing.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = = 3\n")
    with pytest.raises(UserError, match="line 1"):
        parse_config(TrainConfig, [str(bad)])
    typo = tmp_path / "typo.py"
    typo.write_text("n_layers = 3\n")
    with pytest.raises(UserError, match="did you mean --n_layer"):
        parse_config(TrainConfig, [str(typo)])


def test_help_lists_every_key_with_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(TrainConfig, ["--help"], prog="train.py")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--batch_size=12" in out and "sequences per micro-step" in out
    assert out.count("\n  --") + 1 >= len(TrainConfig.__dataclass_fields__)
    assert out.index("--out_dir=") < out.index("--n_layer=")  # train.py's own keys, then the model's options


def test_a_mistake_is_named_once_not_again_through_the_settings_it_bounds():
    """A negative max_iters or learning rate is one reason, not also 'warmup longer than the
    run' or 'min_lr above the learning rate'."""
    assert TrainConfig(max_iters=-1).problems() == ["--max_iters must be >= 0, got -1"]
    assert TrainConfig(learning_rate=-1.0).problems() == ["--learning_rate must be a finite number >= 0, got -1.0"]
    assert TrainConfig(max_iters=10).problems() == []  # a short try of a long warmup runs (train.py says so)
    assert TrainConfig(min_lr=1.0).problems() == ["--min_lr (1.0) is above --learning_rate (0.0006)"]


def test_a_yaml_file_or_a_config_flag_says_how_configs_are_passed(tmp_path):
    (tmp_path / "run.yaml").write_text("batch_size: 8\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"Python files of `key = value` lines .* not YAML: write .*run\.py"):
        parse_config(TrainConfig, [str(tmp_path / "run.yaml")], prog="train.py")
    with pytest.raises(UserError, match=r"passed without a flag, before the others: train.py configs/x\.py --key"):
        parse_config(TrainConfig, ["--config=configs/x.py", "--batch_size=2"], prog="train.py")
    for argv in (["--config", "configs/x.py"], ["--config"], ["--config", "--batch_size=2"]):
        with pytest.raises(UserError, match=r"^a config file is passed without a flag[^;]*$"):
            parse_config(TrainConfig, argv, prog="train.py")


def test_integers_from_the_command_line_are_exact_at_any_length():
    """A float would round a 19-digit seed to another number; "5e3" still means 5000."""
    from config import coerce
    assert coerce("seed", "18446744073709551615", int) == 18446744073709551615
    assert coerce("seed", "9007199254740993", int) == 9007199254740993  # 2**53 + 1: a float says ...992
    assert coerce("max_iters", "5e3", int) == 5000 and coerce("max_iters", 5000.0, int) == 5000
    with pytest.raises(ValueError, match="must be an integer"):
        coerce("max_iters", "5.5", int)


def test_flags_win_over_a_config_file_wherever_they_stand(tmp_path):
    """`train.py --max_iters=7 configs/x.py` and `train.py configs/x.py --max_iters=7` mean the
    same: a flag is the user's last word (the file used to override flags before it, silently)."""
    config = tmp_path / "x.py"
    config.write_text("max_iters = 120\nn_layer = 4\nbatch_size = 8\n", encoding="utf-8")
    for argv in (["--max_iters=7", "--n_layer=1", str(config)], [str(config), "--max_iters=7", "--n_layer=1"]):
        cfg, explicit = parse_config(TrainConfig, argv, check=False)
        assert (cfg.max_iters, cfg.n_layer, cfg.batch_size) == (7, 1, 8), argv
        assert {"max_iters", "n_layer", "batch_size"} <= explicit


def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(tmp_path, monkeypatch):
    """--out_dir=~/runs reaches the script unexpanded (no shell expands a ~ after "="): it is the
    home folder, not a folder named ~ in the working one; other text keeps its ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))  # (Windows' home)
    from sample import SampleConfig
    cfg, _ = parse_config(SampleConfig, ["--out_dir=~/runs/a", "--prompt=~/not a path"])
    assert cfg.out_dir == str(tmp_path / "runs" / "a") and cfg.prompt == "~/not a path"


def test_a_missing_config_file_names_the_shipped_one_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"config file configs/shakespeare_quick.py not found; did you mean "
                                        r".*configs.shakespeare_quick.py\?"):
        parse_config(TrainConfig, ["configs/shakespeare_quick.py"])



def test_a_bare_bool_flag_before_a_config_file_is_true_and_the_file_still_counts():
    """`train.py --compile configs/shakespeare_cpu.py`: the file is not --compile's value; the
    flag means true and every setting of the file is taken; `--compile false FILE` is false."""
    path = str(ROOT / "configs" / "shakespeare_cpu.py")
    cfg, explicit = parse_config(TrainConfig, ["--compile", path], check=False)
    assert cfg.compile is True
    assert (cfg.out_dir, cfg.dataset, cfg.n_embd, cfg.optimizer) == ("out-shakespeare-cpu", "shakespeare_char", 192, "muon")
    assert {"compile", "out_dir", "n_embd"} <= explicit
    cfg, _ = parse_config(TrainConfig, ["--eval_train", path, "--compile", "false"], check=False)
    assert (cfg.eval_train, cfg.compile, cfg.out_dir) == (True, False, "out-shakespeare-cpu")  # a flag wins over the file


def test_windows_paths_in_a_config_file_say_how_to_write_them(tmp_path):
    """A Windows path pasted into a config file: 'C:\\Users\\...' does not even parse (\\U is an
    escape), 'runs\\new' parses into a line end. Both are one line saying how to write it."""
    (tmp_path / "a.py").write_text("out_dir = 'C:\\Users\\me\\runs'\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 1 could not be read: SyntaxError: .*unicode error.*write it with "
                                        r"forward slashes \('C:/Users/me/runs'\) or as a raw string"):
        parse_config(TrainConfig, [str(tmp_path / "a.py")])
    (tmp_path / "b.py").write_text("out_dir = 'runs\\new'\ndata_dir = 'D:\\data'\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^--out_dir='runs\\new' holds a control character .* forward slashes"):
        parse_config(TrainConfig, [str(tmp_path / "b.py")])
    (tmp_path / "c.py").write_text("out_dir = r'runs\\new'\ndata_dir = 'D:/data'\n", encoding="utf-8")
    assert parse_config(TrainConfig, [str(tmp_path / "c.py")])[0].out_dir == "runs\\new"


def test_a_wrong_type_in_a_config_file_names_the_file(tmp_path):
    (tmp_path / "c.py").write_text('batch_size = "eight"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"^--batch_size must be an integer, got 'eight' \(set in .*c\.py\)$"):
        parse_config(TrainConfig, [str(tmp_path / "c.py")])
    with pytest.raises(UserError, match=r"^--batch_size must be an integer, got 'nine'$"):  # the flag's own
        parse_config(TrainConfig, [str(tmp_path / "c.py"), "--batch_size=nine"])


def test_only_an_escape_error_gets_the_windows_path_hint_and_a_path_may_hold_spaces(tmp_path):
    (tmp_path / "a.py").write_text("batch_size = = 3\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1 could not be read: SyntaxError") as e:
        parse_config(TrainConfig, [str(tmp_path / "a.py")])
    assert "forward slashes" not in str(e.value)
    (tmp_path / "b.py").write_text("out_dir = 'my runs/first one'\n", encoding="utf-8")
    assert parse_config(TrainConfig, [str(tmp_path / "b.py")])[0].out_dir == "my runs/first one"
