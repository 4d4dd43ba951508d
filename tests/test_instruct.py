"""Instruction data: prepare.py reads JSONL records into token bins with a loss mask beside
them (only answers are in the loss), refuses a bad line in one line naming file and line,
and sampling wraps prompts and chats with the template stored in meta.json; the shared
sampler's min-p and repetition penalty."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import template
from errors import UserError
from model import sample_next
from conftest import TINY
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent

RECORDS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"text": "A plain document {with braces}."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Bye!"}]},
    {"prompt": "Capital of France?", "response": "Paris", "id": 7},  # other keys are ignored
] * 5


def write_jsonl(path: Path, records, extra_lines=()) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def prepare_records(tmp_path, records, *args, name="inst"):
    src = write_jsonl(tmp_path / "records.jsonl", records)
    prepare.main(["--input", str(src), "--name", name, "--data_dir", str(tmp_path / "data"),
                  "--block_size", "8", "--num_workers", "1", *args])
    folder = tmp_path / "data" / name
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    splits = {s: (np.fromfile(folder / f"{s}.bin", dtype=meta["dtype"]),
                  np.fromfile(folder / f"{s}_mask.bin", dtype=np.uint8)) for s in ("train", "val")}
    return meta, splits


def records_of(ids, mask, tokenizer):
    """Each record of a split as (its whole text, the text of its tokens in the loss), the
    boundary that closes it shown as <EOT> in the second."""
    bounds = np.flatnonzero(ids == tokenizer.eot_id)
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        body, flags = ids[a + 1:b + 1], mask[a + 1:b + 1]
        trained = "".join("<EOT>" if i == tokenizer.eot_id else tokenizer.decode([i])
                          for i, f in zip(body, flags) if f)
        out.append((tokenizer.decode(body[:-1]), trained))
    return out


@pytest.mark.parametrize("tok", ["char", "gpt2"])
def test_records_become_documents_with_the_answers_in_the_loss(tmp_path, tok):
    meta, splits = prepare_records(tmp_path, RECORDS, "--tokenizer", tok, "--shuffle", "false",
                                   "--val_fraction", "0.2")
    tokenizer = Tokenizer.from_description(meta)
    assert meta["documents"] == "jsonl" and tokenizer.documents == "jsonl"
    assert meta["template"] == template.TEMPLATE and meta["chat"] is True
    assert meta["records"] == {"text": 5, "prompt_response": 10, "messages": 5}
    assert (meta["train_documents"], meta["val_documents"]) == (16, 4)
    for split, (ids, mask) in splits.items():
        assert len(ids) == len(mask) == meta[f"{split}_tokens"]
        assert int(mask.sum()) == meta["loss_mask"][f"{split}_loss_tokens"]
        assert ids[0] == ids[-1] == tokenizer.eot_id and mask[0] == 0
    got = records_of(*splits["train"], tokenizer) + records_of(*splits["val"], tokenizer)
    user, assistant, end = template.TEMPLATE["user"], template.TEMPLATE["assistant"], template.TEMPLATE["end"]
    expected = [
        (user.replace("{content}", "What is 2+2?") + assistant + "4", "4<EOT>"),
        ("A plain document {with braces}.", "A plain document {with braces}.<EOT>"),
        ("<|system|>\nBe brief.\n" + user.replace("{content}", "Hi") + assistant + "Hello!" + end
         + user.replace("{content}", "Bye") + assistant + "Bye!" + end, "Hello!" + end + "Bye!" + end + "<EOT>"),
        (user.replace("{content}", "Capital of France?") + assistant + "Paris", "Paris<EOT>"),
    ] * 5
    assert got == expected


def test_records_of_text_only_are_documents_not_instructions(tmp_path, capsys):
    """A JSONL file of {"text": ...} records only: documents, every token in the loss, no
    template (and none of its characters in a char vocabulary); its model continues a prompt and
    an empty prompt starts a new document, as a --documents=line model does."""
    import sample
    import train
    texts = [{"text": f"jab cross hook {i % 7}"} for i in range(60)]
    meta, splits = prepare_records(tmp_path, texts, "--tokenizer", "char", name="docs")
    assert "template" not in meta and "chat" not in meta and meta["records"]["text"] == 60
    assert set(meta["chars"]) == set("".join(t["text"] for t in texts))  # no '<', '|', '>', '\n'
    assert all(mask[1:].all() for _, mask in splits.values())  # every target in the loss
    train.main([f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", *TINY, "--dataset=docs",
                "--block_size=16", "--max_iters=2", "--eval_interval=2"])
    capsys.readouterr()
    for prompt in ("", "jab"):
        sample.main([f"--out_dir={tmp_path / 'out'}", f"--prompt={prompt}", "--max_new_tokens=5", "--device=cpu"])
        assert capsys.readouterr().out.startswith(prompt)  # continued, not wrapped in a template


def test_sampling_wraps_prompts_as_training_did(tmp_path):
    meta, splits = prepare_records(tmp_path, RECORDS[:1] * 20, "--tokenizer", "gpt2")
    tokenizer = Tokenizer.from_description(meta)
    ids = template.prompt_ids(tokenizer, meta["template"], "What is 2+2?")
    record = splits["train"][0][:len(ids) + 2].tolist()
    assert record[:len(ids)] == ids  # the prompt is exactly the start of a training record
    assert tokenizer.decode(record[len(ids):]) == "4<|endoftext|>"


def test_stop_strings_never_hold_an_empty_string():
    """A template whose user turn starts with its content marks no next turn: no empty stop string
    (it would end every answer at once, and split nothing)."""
    bare = {**template.TEMPLATE, "user": "{content}\n", "end": "<end>\n"}
    assert template.stop_strings(bare) == ["<end>"]
    assert template.stop_strings(template.TEMPLATE) == ["<|end|>", "<|user|>"]


def test_chat_drops_the_oldest_turns_to_fit():
    tokenizer = Tokenizer.tiktoken("gpt2")
    turns = [("system", "Be brief."), ("user", "one " * 20), ("assistant", "uno " * 20),
             ("user", "two"), ("assistant", "dos"), ("user", "three")]
    full, dropped = template.chat_ids(tokenizer, template.TEMPLATE, turns, budget=1000)
    assert dropped == 0 and tokenizer.decode(full).endswith("<|user|>\nthree\n<|assistant|>\n")
    record = {"messages": [{"role": r, "content": c} for r, c in turns]}
    ids, _ = template.encode_parts(tokenizer, template.record_parts(record, "messages", template.TEMPLATE))
    assert full == [tokenizer.eot_id] + ids.tolist() + tokenizer.encode(template.TEMPLATE["assistant"])
    short, dropped = template.chat_ids(tokenizer, template.TEMPLATE, turns, budget=60)
    assert dropped == 2 and len(short) <= 60  # the long first exchange went, whole
    text = tokenizer.decode(short)
    assert text.startswith("<|endoftext|><|system|>\nBe brief.\n<|user|>\ntwo\n") and "one" not in text
    newest, dropped = template.chat_ids(tokenizer, template.TEMPLATE, turns, budget=5)
    assert dropped == 4 and tokenizer.decode(newest).endswith("three\n<|assistant|>\n")  # the newest stays
    # every budget the newest turn fits in is kept to, counting the leading boundary token; a
    # budget the whole chat fits in keeps every turn
    floor = len(newest)
    for budget in [*range(floor, floor + 4), *range(len(short) - 3, len(short) + 4), *range(len(full) - 3, len(full) + 3)]:
        ids, dropped = template.chat_ids(tokenizer, template.TEMPLATE, turns, budget=budget)
        assert len(ids) <= budget and ids[0] == tokenizer.eot_id, (budget, len(ids), dropped)
        assert (dropped == 0) == (budget >= len(full)), (budget, dropped)


BAD_LINES = {
    "broken JSON": ('{"prompt": "a", "response": }', "records.jsonl:3: not valid JSON"),
    "not an object": ('["a", "b"]', "records.jsonl:3: a record must be a JSON object, got a list"),
    "no known field": ('{"question": "a"}', 'records.jsonl:3: the record has none of "text", "prompt" and '
                       '"response", or "messages" (its keys: \'question\'); a .jsonl file that is no instruction '
                       'data (a JSON log, say) is read as plain text with --format=text'),
    "ShareGPT": ('{"messages": [{"from": "human", "value": "hi"}]}', "records.jsonl:3: messages[0].role must be "
                 "system, user or assistant, got no role but 'from', 'value' (ShareGPT's from/value: rename them"),
    "ShareGPT file": ('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}',
                      "records.jsonl:3: the record has none of \"text\", \"prompt\" and \"response\", or \"messages\" "
                      "(its keys: 'conversations'); ShareGPT's \"conversations\": rename it \"messages\", each turn's "
                      "\"from\" and \"value\" \"role\" and \"content\", and \"human\" and \"gpt\" \"user\" and "
                      "\"assistant\""),
    "Alpaca": ('{"instruction": "add", "input": "1 2", "output": "3"}', "records.jsonl:3: the record has none of "
               "\"text\", \"prompt\" and \"response\", or \"messages\" (its keys: 'instruction', 'input', 'output'); "
               "Alpaca's instruction, input and output: \"prompt\" is the instruction"),
    "missing response": ('{"prompt": "a"}', 'records.jsonl:3: the record has "prompt" but no "response"'),
    "wrong type": ('{"prompt": "a", "response": 4}', 'records.jsonl:3: "response" must be a string, got a number'),
    "mixed kinds": ('{"text": "a", "prompt": "b"}', "records.jsonl:3: the record mixes"),
    "bad role": ('{"messages": [{"role": "bot", "content": "hi"}]}', "records.jsonl:3: messages[0].role must be"),
    "no assistant": ('{"messages": [{"role": "user", "content": "hi"}]}',
                     'records.jsonl:3: "messages" has no assistant turn'),
    "content not text": ('{"messages": [{"role": "assistant", "content": null}]}',
                         "records.jsonl:3: messages[0].content must be a string, got a null"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_line_is_one_error_naming_file_and_line_and_nothing_is_written(tmp_path, case):
    line, message = BAD_LINES[case]
    src = write_jsonl(tmp_path / "records.jsonl", RECORDS[:1], extra_lines=["", line] + [json.dumps(RECORDS[0])] * 9)
    with pytest.raises(UserError) as e:
        prepare.main(["--input", str(src), "--name", "bad", "--data_dir", str(tmp_path / "data")])
    assert str(e.value).startswith(f"{tmp_path / message}") and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()  # the folder it created is gone again, lock and all


def test_line_ends_inside_a_records_strings_are_line_ends(tmp_path):
    """A JSON string written on Windows holds "\\r\\n": no model learns "\\r" from it (as from the
    file's own line ends); the ids and masks are those of the same records with "\\n"."""
    windows = [{"prompt": "line one\r\nline two\rthree", "response": "ok\r\n"},
               {"messages": [{"role": "user", "content": "hi\r\n"}, {"role": "assistant", "content": "a\r\nb"}]}]
    plain = json.loads(json.dumps(windows).replace("\\r\\n", "\\n").replace("\\r", "\\n"))
    for name, records in (("windows", windows), ("plain", plain)):
        write_jsonl(tmp_path / f"{name}.jsonl", records * 20)
        prepare.main(["--input", str(tmp_path / f"{name}.jsonl"), "--name", name, "--tokenizer", "char",
                      "--block_size", "8", "--data_dir", str(tmp_path / "data")])
    meta = json.loads((tmp_path / "data" / "windows" / "meta.json").read_text(encoding="utf-8"))
    assert "\r" not in meta["chars"]
    for f in ("train.bin", "val.bin", "train_mask.bin", "val_mask.bin"):
        assert (tmp_path / "data" / "windows" / f).read_bytes() == (tmp_path / "data" / "plain" / f).read_bytes(), f


def test_format_flags_and_a_custom_template(tmp_path):
    src = write_jsonl(tmp_path / "records.txt", RECORDS)
    with pytest.raises(UserError, match="drop --documents"):
        prepare.main(["--input", str(src), "--format", "jsonl", "--documents", "line", "--name", "x",
                      "--data_dir", str(tmp_path / "data")])
    custom = {"system": "S: {content}\n", "user": "Q: {content}\n", "assistant": "A: ", "end": " <END>\n"}
    (tmp_path / "t.json").write_text(json.dumps(custom), encoding="utf-8")
    prepare.main(["--input", str(src), "--format", "jsonl", "--template", str(tmp_path / "t.json"),
                  "--name", "x", "--data_dir", str(tmp_path / "data"), "--block_size", "8", "--tokenizer", "char"])
    meta = json.loads((tmp_path / "data" / "x" / "meta.json").read_text(encoding="utf-8"))
    assert meta["template"] == custom and template.stop_strings(custom) == [" <END>", "Q:"]
    (tmp_path / "t.json").write_text(json.dumps({**custom, "user": "Q:"}), encoding="utf-8")
    with pytest.raises(UserError, match="must hold {content}"):
        prepare.main(["--input", str(src), "--format", "jsonl", "--template", str(tmp_path / "t.json"),
                      "--name", "y", "--data_dir", str(tmp_path / "data")])
    # a plain text dataset prepared over it later leaves no stale mask behind
    (tmp_path / "plain.txt").write_text("plain text " * 50, encoding="utf-8")
    prepare.main(["--input", str(tmp_path / "plain.txt"), "--name", "x", "--data_dir", str(tmp_path / "data"),
                  "--block_size", "8", "--tokenizer", "char"])
    assert sorted(p.name for p in (tmp_path / "data" / "x").iterdir()) == ["meta.json", "train.bin", "val.bin"]


# ---------------------------------------------------------------- the shared sampler

def test_min_p_keeps_tokens_near_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 1.0, min_p=0.5, generator=g).item() for _ in range(300)}
    assert drawn == {0, 1}  # 0.3 >= 0.5 * 0.5; 0.15 is not
    drawn = {sample_next(logits, 1.0, min_p=0.2, generator=g).item() for _ in range(300)}
    assert drawn == {0, 1, 2}
    assert {sample_next(logits, 1.0, min_p=1.0, generator=g).item() for _ in range(50)} == {0}


def test_repetition_penalty_as_hugging_face():
    from transformers import RepetitionPenaltyLogitsProcessor
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5, -0.2]])
    seen = torch.tensor([[0, 1, 1]])
    theirs = RepetitionPenaltyLogitsProcessor(1.8)(seen, logits.clone())
    assert sample_next(logits, 0, repetition_penalty=1.8, seen=seen).item() == theirs.argmax().item() == 2
    assert sample_next(logits, 0, repetition_penalty=1.0, seen=seen).item() == 0


# ---------------------------------------------------------------- training on the answers only

def tiny_hf_folder(folder: Path, tokenizer, n_positions=64) -> Path:
    """A small GPT-2 with random weights saved by transformers, with our tokenizer's files: a
    pretrained model to finetune, as --init_from=FOLDER reads one."""
    transformers = pytest.importorskip("transformers")
    import hf_format
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=tokenizer.vocab_size,
                                     n_positions=n_positions, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    hf_format.hf_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(hf_format.tokenizer_config(tokenizer, n_positions)))
    return folder


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory):
    """data_dir with 'inst' (char-level records of RECORDS) and a tiny GPT-2 folder for it."""
    root = tmp_path_factory.mktemp("instruct")
    meta, _ = prepare_records(root, RECORDS * 4, "--tokenizer", "char", name="inst")
    tiny_hf_folder(root / "base", Tokenizer.from_description(meta))
    return root


def test_targets_outside_the_answers_are_ignored_in_every_batch(instruct_data):
    from dataset import Dataset
    data = Dataset(str(instruct_data / "data"), "inst")
    flags = np.fromfile(instruct_data / "data" / "inst" / "val_mask.bin", dtype=np.uint8)
    tokens = np.fromfile(instruct_data / "data" / "inst" / "val.bin", dtype=np.uint16).astype(np.int64)
    starts = data.row_starts("val", 32)
    assert len(starts) > 0 and all(flags[s + 1:s + 33].any() for s in starts)  # every window trains something
    x, y, positions = data.get_batch("val", 8, 32, torch.Generator().manual_seed(0), "cpu")
    expected = lambda s: np.where(flags[s + 1:s + 33] == 1, tokens[s + 1:s + 33], -1)  # noqa: E731
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        at = [s for s in starts if (tokens[s:s + 32] == row_x).all()]
        assert at, "a row's inputs are a window of the split at a row start, every token kept"
        assert any((row_y == expected(s)).all() for s in at)
    assert (y == -1).any() and (y != -1).any()
    kept = y[:, :-1] != -1  # where a target is kept it is the next input
    assert (y[:, :-1][kept] == x[:, 1:][kept]).all()


def run_train(root, out, *flags):
    import train
    train.main([f"--data_dir={root / 'data'}", f"--out_dir={root / out}", "--dataset=inst",
                f"--init_from={root / 'base'}", "--block_size=32", "--batch_size=4", "--eval_iters=2",
                "--warmup_iters=0", "--learning_rate=3e-2", "--dtype=float32", "--device=cpu",
                "--eval_at_start=false", *flags])


def test_lora_resumes_exactly_holds_little_optimizer_state_and_loads_merged(instruct_data):
    import checkpoint
    import loading
    import lora
    root = instruct_data
    run_train(root, "straight", "--lora_rank=4", "--lora_dropout=0.1", "--max_iters=6", "--eval_interval=3")
    run_train(root, "halves", "--lora_rank=4", "--lora_dropout=0.1", "--max_iters=3", "--eval_interval=3")
    run_train(root, "halves", "--init_from=resume", "--max_iters=6")
    a, b = checkpoint.load(root / "straight"), checkpoint.load(root / "halves")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": "c_attn,c_proj"}
    assert a["instruct"]["template"] == template.TEMPLATE and a["tokenizer"]["documents"] == "jsonl"
    adapters = [v for k, v in a["model"].items() if k.endswith((".lora_A", ".lora_B"))]
    n_state = sum(t.numel() for s in a["optimizer"]["state"].values() for t in s.values() if t.dim())
    assert n_state == 2 * sum(t.numel() for t in adapters)  # Adam's two moments of the adapters, nothing else
    model, tokenizer, _ = loading.load_model(str(root / "straight"), "cpu")
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())  # a plain GPT
    adapted = loading.load_model(str(root / "straight"), "cpu")[0]
    lora.apply(adapted, lora.LoRAConfig(**a["lora"]))
    adapted.load_state_dict(a["model"])
    x = torch.tensor([template.prompt_ids(tokenizer, a["instruct"]["template"], "What is 2+2?")[-16:]])
    with torch.no_grad():
        assert torch.allclose(model(x, x)[0], adapted.eval()(x, x)[0], atol=1e-5)


def test_lora_and_sampling_values_out_of_range_are_one_line(instruct_data):
    with pytest.raises(UserError, match="--lora_rank adapts a trained model"):
        run_train(instruct_data, "x", "--lora_rank=4", "--init_from=scratch")
    with pytest.raises(UserError, match="--lora_dropout must be in"):
        run_train(instruct_data, "x", "--lora_rank=4", "--lora_dropout=1.5")
    with pytest.raises(UserError, match=r"^--lora_alpha, --lora_targets set LoRA adapters, which --lora_rank=0 "
                                        r"leaves out: add --lora_rank=N"):
        run_train(instruct_data, "x", "--lora_alpha=32", "--lora_targets=c_fc")
    with pytest.raises(UserError, match=r"^--lora_rank trains its adapters with AdamW: drop --optimizer=muon$"):
        run_train(instruct_data, "x", "--lora_rank=4", "--optimizer=muon")
    with pytest.raises(UserError, match="--lora_targets must be"):
        run_train(instruct_data, "x", "--lora_rank=4", "--lora_targets=q_proj")
    with pytest.raises(UserError, match="--lora_rank=1000 is not below the model's narrowest layer"):
        run_train(instruct_data, "x", "--lora_rank=1000")


def test_make_instructions_mistakes_are_one_line(chat_run, tmp_path):
    """data/make_instructions.py: its settings, and --score on a folder without a model, on a model
    of plain text and on one that never saw the tasks' characters."""
    import subprocess
    import sys
    plain = tmp_path / "plain"
    plain.mkdir()
    import checkpoint
    saved = checkpoint.load(chat_run)
    checkpoint.save({**saved, "instruct": None}, plain / "ckpt.pt")
    hf = tmp_path / "hf"  # an export's folder (a GPT-2 config, no ckpt.pt)
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    (hf / "model.safetensors").write_bytes(b"")
    script = str(ROOT / "data" / "make_instructions.py")
    for args, message in ((["--n", "-5"], "--n must be at least 1"),
                          (["--chat_fraction", "2"], "--chat_fraction must be in [0, 1]"),
                          (["--score", str(tmp_path / "nowhere")], "no checkpoint at"),
                          (["--score", str(tmp_path / "nowhere")], "point --score at the folder"),
                          (["--score", str(hf)], "is a Hugging Face folder, not a run's checkpoint folder (ckpt.pt): "
                                                 "pass the --score of the run it came from"),
                          (["--score", str(plain)], "a model trained on plain text"),
                          (["--score", str(chat_run), "--n", "3"], "never saw")):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, (args, r.stderr)


# ---------------------------------------------------------------- sampling an instruction model

@pytest.fixture(scope="module")
def chat_run(instruct_data):
    """A model trained (briefly) on the records, chats included: its checkpoint folder."""
    run_train(instruct_data, "chat", "--max_iters=2", "--eval_interval=2")
    return instruct_data / "chat"


def wrapped_answer(model, tokenizer, tmpl, prompt: str, n: int) -> str:
    """The greedy answer to prompt wrapped in the template tmpl, up to its end: what sample.py
    and app.py give for an instruction model (the answer alone; an unwrapped prompt answers otherwise)."""
    from stopping import StopCondition
    ids = torch.tensor([template.prompt_ids(tokenizer, tmpl, prompt)])
    stop = StopCondition.for_model(tokenizer, 1, template.stop_strings(tmpl))
    for next_id in model.generate_stream(ids, n, temperature=0):
        if stop.update(next_id.tolist()):
            break
    stop.finish()
    return stop.text(0)


def test_an_empty_prompt_to_an_instruction_model_is_one_line(chat_run, capsys):
    """Nothing to answer: refused by sample.py as by app.py's page and chat, not answered from an
    empty user turn."""
    import app
    import hardware
    import sample
    from errors import run_main
    with pytest.raises(SystemExit):
        run_main(sample.main, [f"--out_dir={chat_run}", "--prompt= ", "--device=cpu"])
    assert capsys.readouterr().err.strip().endswith("an instruction model answers a question or a task; give "
                                                    "one like those it was trained on")
    models = app.Models({"chat": chat_run}, hardware.resolve("cpu", "float32"))
    with pytest.raises(Exception, match="the prompt is empty"):
        list(app.generate(models, 100, 0.0, "", 4, 0, 0, 1.0, 1, "chat"))


def test_sample_wraps_the_prompt_and_a_chat_keeps_what_fits(chat_run, capsys):
    import hardware
    import loading
    import sample
    sample.main([f"--out_dir={chat_run}", "--prompt=What is 2+2?", "--max_new_tokens=5", "--dtype=float32",
                 "--device=cpu", "--temperature=0"])
    model, tokenizer, info = loading.load(str(chat_run), "cpu")
    tmpl = info["instruct"]["template"]
    assert capsys.readouterr().out == wrapped_answer(model, tokenizer, tmpl, "What is 2+2?", 5) + "\n"
    cfg = sample.SampleConfig(max_new_tokens=4, temperature=0, stop=template.stop_strings(tmpl))
    history, out = [], __import__("io").StringIO()
    for line in ("Hi", "What is 2+2?"):  # the second no longer fits beside the first in 32 tokens
        sample.chat_turn(model, tokenizer, cfg, hardware.resolve("cpu", "float32"), torch.Generator(), out,
                         tmpl, 32, history, line)
    assert [turn for turn, _ in history] == ["user", "assistant"] and history[0][1] == "What is 2+2?"
    assert "oldest turns no longer fit" in capsys.readouterr().err
    assert out.getvalue().count("\n") == 2  # one answer line per turn
    # a question longer than the whole context: the model would read it without its template's start
    block = model.config.block_size
    sample.chat_turn(model, tokenizer, cfg, hardware.resolve("cpu", "float32"), torch.Generator(), out, tmpl, 32,
                     [], "What is 2+2? " * 4)
    assert "more than the model's context of 32: it reads only the last 32, without the start of the template" in \
        capsys.readouterr().err
    sample.main([f"--out_dir={chat_run}", "--prompt=" + "What is 2+2? " * block, "--max_new_tokens=2",
                 "--device=cpu"])
    assert f"more than the model's context of {block}: it reads only the last {block}, without" in \
        capsys.readouterr().err


def test_an_answer_stops_at_the_end_marker():
    from stopping import StopCondition
    tokenizer = Tokenizer.tiktoken("gpt2")
    stop = StopCondition.for_model(tokenizer, 1, template.stop_strings(template.TEMPLATE))
    for i in tokenizer.encode("Paris<|end|>\n<|user|>\nmore"):
        if stop.update([i]):
            break
    assert stop.text(0) == "Paris"


def test_app_wraps_prompts_holds_a_chat_and_checks_the_new_settings(instruct_data, chat_run):
    import app
    import hardware
    models = app.Models({"chat": chat_run, "base": instruct_data / "base"}, hardware.resolve("cpu", "float32"))
    # the page says what sample.py says of a question longer than the model's context (a toast)
    warnings, block = [], models.get("chat").model.config.block_size
    list(app.generate(models, 100, 0.0, "What is 2+2? " * block, 2, 0, 0, 1.0, 1, "chat", warn=warnings.append))
    list(app.chat(models, 100, 0.0, "What is 2+2? " * block, [], 2, 0, 0, 1.0, 1, "chat", warn=warnings.append))
    assert len(warnings) == 2 and all(w.startswith("the prompt is ") and "without the start of the template" in w
                                      for w in warnings), warnings
    list(app.generate(models, 100, 0.0, "Hi", 2, 0, 0, 1.0, 1, "chat", warn=warnings.append))  # (it fits)
    assert len(warnings) == 2
    texts = list(app.generate(models, 100, 0.0, "What is 2+2?", 4, 0, 0, 1.0, 1, "chat"))
    loaded = models.get("chat")
    assert texts[-1] == wrapped_answer(loaded.model, loaded.tokenizer, loaded.info["instruct"]["template"],
                                       "What is 2+2?", 4)  # the answer alone, as sample.py prints it
    list(app.generate(models, 100, 0.0, "What is 2+2?", 4, 0, 0, 1.0, 1, "chat", 0.1, 1.2))  # the new settings run
    history = list(app.chat(models, 100, 0.0, "Hi", [], 4, 0, 0, 1.0, 1, "chat"))[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hi"
    history = list(app.chat(models, 100, 0.0, "Bye", history, 4, 0, 0, 1.0, 1, "chat"))[-1]
    assert [m["content"] for m in history][::2] == ["Hi", "Bye"]
    with pytest.raises(UserError, match="not trained on chats"):
        list(app.chat(models, 100, 0.0, "Hi", [], 4, 0, 0, 1.0, 1, "base"))
    with pytest.raises(UserError, match="min_p must be in .0, 1.*repetition_penalty must be a finite number above 0"):
        list(app.generate(models, 100, 0.0, "x", 4, 0, 0, 1.0, 1, "chat", 1.5, 0))


def test_the_chat_api_continues_the_history_it_returned(chat_run, tmp_path):
    """docs/app.md's /chat over HTTP, through gradio_client against a real app.py: the history
    /chat returns, passed back, continues the chat; messages in the documented form (content as
    a list of text parts) are read as the page's are."""
    client_module = pytest.importorskip("gradio_client")
    from conftest import serve
    server = serve([f"--out_dir={chat_run}"], tmp_path / "app.log")
    url = next(server)
    try:
        client = client_module.Client(url, verbose=False)
        settings = (4, 0.0, 0, 1.0, 1)  # max_new_tokens, temperature, top_k, top_p, seed
        first = client.predict("Hi", [], *settings, api_name="/chat")
        assert [m["role"] for m in first] == ["user", "assistant"]
        assert first[0]["content"] == [{"text": "Hi", "type": "text"}]
        second = client.predict("Bye", first, *settings, api_name="/chat")
        assert second[:2] == first and [m["role"] for m in second] == ["user", "assistant"] * 2
        typed = [{"role": m["role"], "content": [{"type": "text", "text": m["content"][0]["text"]}]} for m in first]
        assert client.predict("Bye", typed, *settings, api_name="/chat") == second
    finally:
        server.close()


@pytest.mark.parametrize("flag, message", [("--min_p=2", "--min_p must be in [0, 1]"),
                                           ("--min_p=nan", "--min_p must be in [0, 1]"),
                                           ("--repetition_penalty=0", "--repetition_penalty must be a finite")])
def test_sample_refuses_sampling_values_out_of_range(flag, message):
    import sample
    with pytest.raises(UserError) as e:
        sample.main(["--out_dir=nowhere", flag])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_fast_path_draws_as_the_model_with_min_p_and_repetition_penalty(chat_run):
    import loading
    from fast_decode import FastDecoder
    model = loading.load(str(chat_run), "cpu")[0]
    idx = torch.tensor([[0, 5, 6, 7], [0, 9, 9, 9]])
    options = dict(temperature=1.0, min_p=0.02, repetition_penalty=1.3)
    draw = lambda generate, seed: generate(idx, 40, generator=torch.Generator().manual_seed(seed), **options)  # noqa: E731
    assert torch.equal(draw(FastDecoder(model, "float32").generate, 1), draw(model.generate, 1))
    assert not torch.equal(draw(model.generate, 1), draw(model.generate, 2))


def test_lora_finetunes_a_checkpoint_folder_of_ours(instruct_data, chat_run):
    import checkpoint
    run_train(instruct_data, "from_ckpt", f"--init_from={chat_run}", "--lora_rank=2", "--max_iters=2",
              "--eval_interval=2")
    mine, base = checkpoint.load(instruct_data / "from_ckpt"), checkpoint.load(chat_run)
    for key in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight"):
        assert torch.equal(mine["model"][key], base["model"][key])  # frozen, as the checkpoint had them
    assert mine["lora"]["rank"] == 2 and mine["instruct"] == base["instruct"]
    import export  # its card says it is a LoRA finetune, of what, and what kind of model
    export.main([f"--out_dir={instruct_data / 'from_ckpt'}", f"--dest={instruct_data / 'lora-hf'}"])
    card = (instruct_data / "lora-hf" / "README.md").read_text(encoding="utf-8")
    assert (f"finetuned from {chat_run} with LoRA (rank 2 on c_attn,c_proj, merged into the weights) on instruction "
            f"records") in card


# ---------------------------------------------------------------- sharing an instruction model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there,  friend!"},
        {"role": "assistant", "content": "Hello! 123"}, {"role": "user", "content": "What's 2+2? ünï 😀"}]


@pytest.mark.parametrize("name", ["gpt2", "char"])
def test_the_chat_template_gives_transformers_the_ids_sampling_uses(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    import hf_format
    text = "".join(m["content"] for m in CHAT) + "".join(template.TEMPLATE.values()) + '#()"}{% '
    tok = Tokenizer.tiktoken("gpt2") if name == "gpt2" else Tokenizer.char_from_text(text, documents="jsonl")
    custom = {**template.TEMPLATE, "user": "### {content} ({content})\n", "end": '"}} {% end %}\n'}
    for tmpl in (template.TEMPLATE, custom):  # a custom template's quotes and braces stay text
        hf_format.hf_tokenizer(tok).save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(
            json.dumps(hf_format.tokenizer_config(tok, 1024, {"template": tmpl, "chat": True})))
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
        for messages in (CHAT, CHAT[1:2]):
            ours = template.chat_ids(tok, tmpl, [(m["role"], m["content"]) for m in messages], 10**6)[0]
            assert hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"] == ours
        assert hf_format.instruct_of(tmp_path) == {"template": tmpl, "chat": True}
    assert template.prompt_ids(tok, tmpl, CHAT[1]["content"]) == ours  # one user turn: a prompt's wrapping


def test_the_onnx_card_of_an_instruction_model_wraps_the_question_and_shows_the_answer(chat_run, tmp_path):
    """The ONNX export's model card runs as written (onnxruntime and tokenizers, no torch) and
    answers as sample.py does: the question wrapped in the model's template, the answer alone."""
    pytest.importorskip("onnxruntime")
    import re
    import subprocess
    import export
    export.main([f"--out_dir={chat_run}", f"--dest={tmp_path / 'onnx'}", "--format=onnx"])
    card = (tmp_path / "onnx" / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    question, n = re.search(r'folder, prompt, max_new_tokens = ".*", "(.*)", (\d+)\n', code).groups()
    assert question == "2+2?" and int(n) == 3  # a shorter question where "What is 2+2?" does not fit block_size 32
    code += "import sys\nassert 'torch' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    import loading
    model, tokenizer, info = loading.load(str(chat_run), "cpu")
    assert proc.stdout == wrapped_answer(model, tokenizer, info["instruct"]["template"], question, int(n)) + "\n"


def test_an_exported_instruction_model_keeps_its_template(chat_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import export
    import sample
    export.main([f"--out_dir={chat_run}", f"--dest={tmp_path / 'hf'}", "--format=hf"])
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template.chat_template(template.TEMPLATE)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "apply_chat_template" in card  # the card shows how, and says what kind of model it is
    assert "on instruction records (a question, then its answer, and chats), so a prompt goes through" in card
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                        return_dict=True)
    tok = Tokenizer.from_description(config["nanogpt_tokenizer"])
    assert ids["input_ids"] == template.prompt_ids(tok, template.TEMPLATE, "What is 2+2?")
    capsys.readouterr()
    sample.main([f"--init_from={tmp_path / 'hf'}", "--prompt=What is 2+2?", "--max_new_tokens=5",
                 "--dtype=float32", "--device=cpu", "--temperature=0"])
    import loading
    model, tokenizer, info = loading.load_hf(str(tmp_path / "hf"), "cpu")
    assert capsys.readouterr().out == wrapped_answer(model, tokenizer, info["instruct"]["template"],
                                                     "What is 2+2?", 5) + "\n"  # wrapped, as from ckpt.pt


def test_eval_scores_the_answers_only_as_training_does(chat_run, instruct_data, capsys):
    """eval.py on an instruction dataset scores what train.py's val loss does: the answers and
    their ends (the loss mask), each record from its own start; checked against a forward pass
    over each record by hand."""
    import eval as eval_script
    from loading import load_model
    from torch.nn import functional as F
    eval_script.main([f"--out_dir={chat_run}", "--json"])
    out = capsys.readouterr().out
    result = json.loads(out)
    folder = instruct_data / "data" / "inst"
    ids = np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(folder / "val_mask.bin", dtype=np.uint8).astype(bool)
    model, tokenizer, _ = load_model(str(chat_run), "cpu")
    model.float().eval()
    bounds = np.flatnonzero(ids == tokenizer.eot_id)
    nats, tokens = 0.0, 0
    with torch.no_grad():
        T = model.config.block_size
        for a, b in zip(bounds[:-1], bounds[1:]):  # each record: its boundary, its tokens, the next boundary
            for s in range(a, b, T):  # a record longer than a block goes on in blocks, positions from 0 again
                e = min(s + T, b)
                x, y = torch.from_numpy(ids[s:e])[None], torch.from_numpy(ids[s + 1:e + 1])
                logits, _ = model(x, x)
                keep = torch.from_numpy(mask[s + 1:e + 1])
                nats += F.cross_entropy(logits[0].float(), y, reduction="none")[keep].double().sum().item()
                tokens += int(keep.sum())
    assert result["scored"] == "answers" and result["tokens"] == tokens == int(mask[1:].sum()) < len(ids) - 1
    assert result["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    eval_script.main([f"--out_dir={chat_run}"])
    assert f"scored: the answers only ({tokens:,} of {len(ids) - 1:,} tokens)" in capsys.readouterr().out


def test_a_json_array_of_records_is_read_as_text_with_a_note(tmp_path, capsys):
    """An Alpaca-style data.json (a JSON array) is plain text to prepare.py, its syntax and keys
    included: a note says so and how to make JSONL; --format=text takes it as meant."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps([{"instruction": f"Say {i}", "output": str(i)} for i in range(400)], indent=1),
                   encoding="utf-8")
    argv = ["--input", str(src), "--name", "j", "--data_dir", str(tmp_path / "data"), "--tokenizer", "char",
            "--block_size", "8", "--num_workers", "1"]
    prepare.main(argv)
    assert f"note: {src} is read as plain text, its JSON syntax and keys included" in capsys.readouterr().out
    prepare.main([*argv, "--format", "text"])
    assert "note:" not in capsys.readouterr().out


def test_reset_in_an_interactive_chat_says_the_chat_starts_again(chat_run, capsys, monkeypatch):
    import io
    import sample
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n/reset\nquit\n"))
    sample.main([f"--out_dir={chat_run}", "--interactive", "--max_new_tokens=3", "--device=cpu", "--dtype=float32"])
    assert "(a new chat: the turns so far are forgotten)" in capsys.readouterr().err


def test_the_json_note_is_for_json_files_only_whatever_their_first_bracket(tmp_path, capsys):
    """The note about a .json read as text comes for a JSON object too ({"data": [...]}), and
    after leading blank lines; a .txt that opens with a bracket (a stage direction) gets none."""
    records = [{"instruction": f"Say {i}", "output": str(i)} for i in range(400)]
    cases = {"object.json": "\n\n  " + json.dumps({"data": records}), "array.json": "\n" + json.dumps(records),
             "play.txt": "[Enter ROMEO]\n" + "ROMEO: Say it.\n" * 400}
    for name, text in cases.items():
        src = tmp_path / name
        src.write_text(text, encoding="utf-8")
        prepare.main(["--input", str(src), "--name", src.stem, "--data_dir", str(tmp_path / "data"),
                      "--tokenizer", "char", "--block_size", "8", "--num_workers", "1"])
        note = f"note: {src} is read as plain text, its JSON syntax and keys included" in capsys.readouterr().out
        assert note == name.endswith(".json"), name


def test_the_alpaca_hint_needs_both_instruction_and_output():
    with pytest.raises(ValueError, match="Alpaca's instruction, input and output"):
        template.record_kind({"instruction": "add", "output": "3"})
    for record in ({"instruction": "add"}, {"output": "3"}):
        with pytest.raises(ValueError) as e:
            template.record_kind(record)
        assert "Alpaca" not in str(e.value), record
