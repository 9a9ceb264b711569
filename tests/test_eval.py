"""eval.py: sliding-window perplexity and bits per byte, multiple-choice scoring, both against
transformers on the same tokens, and the one-line errors."""

import json
import math
from pathlib import Path

import pytest
import torch

import checkpoint
from config import DataConfig, EvalConfig
from eval import (Example, choice_requests, harness_task_yaml, hellaswag_example, load_scorer, main, read_examples,
                  score_choices, score_text, window_spans)
from prepare_data import prepare
from test_model import make_model
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = ("ROMEO: But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "Arise, fair sun, and kill the envious moon.\n") * 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tokenizer = Tokenizer.train_char(TEXT + "xyz")
    model = make_model(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    checkpoint.save_hf(model, path)
    tokenizer.save(path)
    return path


def hf_sum_nll(folder, ids: list[int], spans) -> tuple[float, int]:
    """The same windows through transformers, summed by hand."""
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in spans:
            logprobs = hf(torch.tensor([ids[begin:end]])).logits[0].log_softmax(-1)
            for p in range(first, end):
                total -= logprobs[p - begin - 1, ids[p]].item()
                count += 1
    return total, count


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (100, 32, 8), (7, 16, 8), (33, 32, 32), (50, 8, 1)])
def test_windows_score_every_token_once_with_the_context_the_stride_allows(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans:
        assert end - begin == min(window, n) and begin <= first - 1
        if begin > 0:
            assert first - begin >= window - stride


@pytest.mark.parametrize("window,stride", [(64, 32), (16, 4), (0, 0)])
def test_text_loss_equals_transformers_on_the_same_windows(folder, tmp_path, window, stride):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    cfg = EvalConfig(checkpoint=str(folder), data=str(text_file), window=window, stride=stride, batch_size=3)
    scorer = load_scorer(cfg)
    ours = score_text(scorer, TEXT, stride, 3)
    ids = transformers.AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]  # no BOS: the tokenizer adds none
    assert ids == scorer.encode(TEXT)
    total, count = hf_sum_nll(folder, ids, window_spans(len(ids), scorer.window, ours["stride"]))
    assert ours["tokens"] == count == len(ids) - 1
    assert ours["loss"] == pytest.approx(total / count, rel=1e-4)
    assert ours["bits_per_byte"] == pytest.approx(total / math.log(2) / ours["bytes"], rel=1e-4)
    assert ours["bytes"] == len(TEXT.encode()) - 1  # the first character is never predicted


def test_a_tokenizer_that_adds_bos_gets_every_token_scored(folder, tmp_path):
    """A post-processor that adds BOS (as Llama's do): the ids are AutoTokenizer's, and the BOS
    gives the first text token something to be predicted from."""
    import shutil

    from tokenizers import processors
    shutil.copytree(folder, tmp_path / "bos")
    tokenizer = Tokenizer.load(tmp_path / "bos")
    bos = tokenizer.backend.id_to_token(tokenizer.bos_id)
    tokenizer.backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                                     special_tokens=[(bos, tokenizer.bos_id)])
    tokenizer.backend.save(str(tmp_path / "bos" / "tokenizer.json"))
    scorer = load_scorer(EvalConfig(checkpoint=str(tmp_path / "bos")))
    ids = scorer.tokenizer.encode_document(TEXT)
    assert ids == transformers.AutoTokenizer.from_pretrained(tmp_path / "bos")(TEXT)["input_ids"]
    assert ids[0] == tokenizer.bos_id
    ours = score_text(scorer, TEXT, 0, 4)
    assert ours["tokens"] == len(TEXT) and ours["bytes"] == len(TEXT.encode())
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]))


def test_a_text_shorter_than_a_window_is_one_window(folder):
    scorer = load_scorer(EvalConfig(checkpoint=str(folder)))
    short = score_text(scorer, "ROMEO:", 0, 4)
    assert short["tokens"] == len("ROMEO:") - 1 and short["window"] == 64


def test_choice_logliks_equal_transformers(folder):
    scorer = load_scorer(EvalConfig(checkpoint=str(folder)))
    example = Example("It is the east, and Juliet", ["is the sun.", "is the moon.", "breaks"], 0)
    result = score_choices(scorer, [example], batch_size=2)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    expected = []
    with torch.no_grad():
        for context, continuation in choice_requests(scorer, example):
            logprobs = hf(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
            expected.append(sum(logprobs[len(context) + i - 1, t].item() for i, t in enumerate(continuation)))
    assert result["per_example"][0]["logliks"] == pytest.approx(expected, abs=1e-4)
    best = max(range(3), key=expected.__getitem__)
    best_norm = max(range(3), key=lambda i: expected[i] / len(example.choices[i]))
    assert (result["acc"], result["acc_norm"]) == (float(best == 0), float(best_norm == 0))


def test_hellaswag_rows_are_posed_as_lm_evaluation_harness_poses_them():
    row = {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "endings": [", the man [title] cleans.", " the  man stops. ", "x", "y"], "label": "1"}
    example = hellaswag_example(row)
    assert example.context == "Removing ice from car: Then, the man writes over the snow. Then"
    assert example.choices[:2] == [", the man. cleans.", "the man stops."] and example.label == 1


def test_hellaswag_is_fetched_and_checked_against_its_git_blob_id(tmp_path, monkeypatch):
    """Without --eval.source the official file is fetched from a pinned commit and checked against
    the id git gives it there; here the "official" file is a local one, its id computed by git."""
    import subprocess

    import eval as eval_module
    row = {"activity_label": "Baking", "ctx_a": "She mixes the flour.", "ctx_b": "she", "label": 0,
           "endings": ["bakes the bread.", "sings.", "flies away.", "sleeps."]}
    local = tmp_path / "hellaswag_val.jsonl"
    local.write_text(json.dumps(row) + "\n")
    blob = subprocess.run(["git", "hash-object", str(local)], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(eval_module, "HELLASWAG_URL", local.as_uri())
    monkeypatch.setattr(eval_module, "HELLASWAG_BLOB", blob)
    name, examples = read_examples(EvalConfig(task="hellaswag"))
    assert name == "hellaswag" and examples[0].context == "Baking: She mixes the flour. She"
    monkeypatch.setattr(eval_module, "HELLASWAG_BLOB", "0" * 40)
    with pytest.raises(Exception, match=f"checksum mismatch .*expected git blob sha1 0{{40}}, got {blob}.*--eval.source"):
        read_examples(EvalConfig(task="hellaswag"))


@pytest.mark.parametrize("row,message", [
    ({"context": "a", "label": 0}, "lacks a field"),
    ({"context": "a", "choices": ["b", "c"], "label": 2}, "must index its 2 choices"),
    ({"context": "a", "choices": ["b"], "label": 0}, "at least two choice strings"),
])
def test_bad_task_rows_are_named_by_their_line(tmp_path, row, message):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "ok", "choices": ["a", "b"], "label": 1}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(Exception, match=message) as error:
        read_examples(EvalConfig(task=str(task)))
    assert "line 2" in str(error.value)


def test_the_command_line_prints_a_table_and_writes_json(folder, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT)
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"context": "It is the", "choices": [" east", " west"], "label": i})
                              for i in (0, 1)))
    out = tmp_path / "r.json"
    assert main([str(folder), "--eval.data", str(tmp_path / "t.txt"), "--eval.task", str(task), "--eval.json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "| mine | 2 |" in printed
    results = json.loads(out.read_text())
    assert results["task"]["examples"] == 2 and results["text"]["tokens"] > 0


@pytest.mark.parametrize("argv,message", [
    ([], "nothing to score"),
    (["--eval.task", "winogrande"], "not a known task"),
    (["--eval.data", "EMPTY"], "at least two are needed"),
    (["--eval.window", "8", "--eval.stride", "9", "--eval.data", "EMPTY"], "exceeds eval.window"),
])
def test_bad_input_is_one_line(folder, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("")
    argv = [a.replace("EMPTY", str(tmp_path / "empty.txt")) for a in argv]
    assert main([str(folder), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_checkpoint_without_a_tokenizer_is_one_line(tmp_path, capsys):
    checkpoint.save_hf(make_model(vocab_size=40, dim=16, n_layers=1, n_heads=2), tmp_path)
    (tmp_path / "t.txt").write_text("hello")
    assert main([str(tmp_path), "--eval.data", str(tmp_path / "t.txt")]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
def test_multiple_choice_agrees_with_lm_evaluation_harness(folder, tmp_path, monkeypatch):
    """lm_eval's hf backend on the same checkpoint and a local task in its YAML format: the same
    log-likelihood for every choice, so the same acc and acc_norm."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"context": c, "choices": ch, "label": label} for c, ch, label in [
        ("It is the east, and", ["Juliet is the sun.", "the moon", "sun"], 0),
        ("Arise, fair sun, and kill", ["the envious moon.", "moon", "the east"], 1),
        ("ROMEO: But soft, what light", ["through yonder window breaks?", "is", "soft"], 2),
        ("Juliet is the", ["sun.", "moon.", "east"], 0)]]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(map(json.dumps, rows)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(harness_task_yaml("nanollama_mc", task))
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                     tasks=["nanollama_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                     device="cpu", batch_size=2, log_samples=True)
    cfg = EvalConfig(checkpoint=str(folder), task=str(task))
    ours = score_choices(load_scorer(cfg), read_examples(cfg)[1], batch_size=3)
    samples = sorted(theirs["samples"]["nanollama_mc"], key=lambda s: s["doc_id"])
    for sample, mine in zip(samples, ours["per_example"]):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(mine["logliks"], abs=1e-4)
    results = theirs["results"]["nanollama_mc"]
    assert (results["acc,none"], results["acc_norm,none"]) == pytest.approx((ours["acc"], ours["acc_norm"]))


def test_training_scores_eval_data_and_tasks_at_each_evaluation(tmp_path):
    """train.py with [eval] data and task: each eval record carries their scores, and they equal
    eval.py's on the checkpoint saved at that step."""
    import subprocess
    import sys

    from test_train import ROOT, TINY
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    subprocess.run([sys.executable, "prepare_data.py", "--data.dataset", "tiny", "--data.data_dir", str(tmp_path),
                    "--data.input", str(corpus), "--data.tokenizer", "char"], cwd=ROOT, check=True, capture_output=True)
    (tmp_path / "held_out.txt").write_text(TEXT[:150])
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"context": "It is the", "choices": [" east", " west"], "label": i}) for i in (0, 1)))
    result = subprocess.run([sys.executable, "train.py", *TINY, "--data.data_dir", str(tmp_path), "--data.dataset", "tiny",
                             "--train.out_dir", str(tmp_path / "run"), "--train.max_steps", "4", "--train.eval_interval", "2",
                             "--eval.data", str(tmp_path / "held_out.txt"), "--eval.task", str(task)],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    assert {"text_loss", "text_bits_per_byte", "mine_acc", "mine_acc_norm"} <= set(evals[-1])
    cfg = EvalConfig(checkpoint=str(tmp_path / "run"), data=str(tmp_path / "held_out.txt"), window=32)
    scored = score_text(load_scorer(cfg), TEXT[:150], 0, 4)
    assert evals[-1]["text_loss"] == pytest.approx(scored["loss"], rel=1e-4)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_training_eval_is_shared_out_across_torchrun_processes(tmp_path, parallel):
    """Under torchrun each process scores every other window and example (under FSDP, where every
    forward involves all processes, each scores them all); the results are the single process's
    (training itself: 2 processes equal 1 with accumulation 2)."""
    import shutil
    import sys

    from test_train import TINY, run_cli
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    prepare(DataConfig(dataset="tiny", data_dir=str(tmp_path), input=str(corpus), tokenizer="char", workers=1))
    (tmp_path / "held_out.txt").write_text(TEXT[:150])
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"context": c, "choices": [" east", " west", " sun"], "label": i})
                              for i, c in enumerate(["It is the", "Juliet is the", "Arise, fair"])))
    common = [*TINY, "--data.data_dir", str(tmp_path), "--data.dataset", "tiny", "--train.max_steps", "2",
              "--train.eval_interval", "2", "--train.batch_tokens", "256", "--train.device", "cpu",
              "--eval.data", str(tmp_path / "held_out.txt"), "--eval.task", str(task), "--eval.batch_size", "2"]
    one = run_cli(*common, "--train.out_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = run_cli(*common, "--train.out_dir", str(tmp_path / "two"), "--train.parallel", parallel,
                  launcher=(torchrun, "--standalone", "--nproc_per_node", "2"))
    assert two.returncode == 0, two.stderr
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "eval"][-1] for run in ("one", "two")]
    for key in ("text_loss", "text_bits_per_byte", "mine_acc", "mine_acc_norm"):
        assert records[1][key] == pytest.approx(records[0][key], rel=1e-5), key


def test_a_prepared_dataset_is_scored_on_its_val_split(folder, tmp_path, capsys):
    """--eval.data DIR: the val.bin prepare_data.py wrote with the checkpoint's tokenizer, scored
    like the text it holds; data from another tokenizer is refused in one line."""
    import numpy as np

    import data
    scorer = load_scorer(EvalConfig(checkpoint=str(folder)))
    ids = scorer.encode(TEXT)
    dataset = tmp_path / "ds"
    dataset.mkdir()
    data.write_tokens(dataset / "val.bin", [np.array(ids)], scorer.tokenizer.vocab_size, scorer.tokenizer.hash)
    assert main([str(folder), "--eval.data", str(dataset), "--eval.json", str(tmp_path / "r.json")]) == 0
    from_dataset = json.loads((tmp_path / "r.json").read_text())["text"]
    from_text = score_text(scorer, TEXT, 0, 4)
    assert from_dataset["loss"] == pytest.approx(from_text["loss"], rel=1e-6)
    assert from_dataset["bytes"] == from_text["bytes"]
    data.write_tokens(dataset / "val.bin", [np.array(ids)], scorer.tokenizer.vocab_size, "ab" * 32)
    capsys.readouterr()
    assert main([str(folder), "--eval.data", str(dataset)]) == 2
    assert "another tokenizer" in capsys.readouterr().err
