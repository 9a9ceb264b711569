"""Score a checkpoint: loss, perplexity and bits per byte over a text; accuracy on multiple choice.

    python eval.py out/run --eval.data notes.txt                   # the whole file, sliding windows
    python eval.py out/run --eval.data data/shakespeare_char       # a prepare_data.py folder's val split
    python eval.py path/to/hf-llama --eval.task hellaswag --eval.source hellaswag_val.jsonl
    python eval.py out/run --eval.task my_task.jsonl               # {"context", "choices", "label"} rows
    python eval.py --help                                          # every option (--eval.<key>)

A text is scored in windows of --eval.window tokens (default: the context the model was trained on)
that move on by --eval.stride: every token is scored exactly once, each with at least window -
stride tokens before it (a text shorter than a window is one window). The text is tokenized as its
tokenizer poses a document (AutoTokenizer's ids): with BOS in front when the tokenizer's
post-processor adds one, so every text token is scored, and otherwise without, the first token
then having nothing to be predicted from. Bits per byte are the total negative log-likelihood in
bits over the UTF-8 bytes of the scored text.

A multiple-choice example is scored as lm-evaluation-harness scores its tasks: the log-likelihood
of " " + choice after the context (the pair tokenized whole, then split where the context ends),
acc from the largest sum and acc_norm from the largest sum per character of the choice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
import prepare_data
from config import ConfigError, EvalConfig, UserError, parse_cli, replace_file, script
from generate import load_tokenizer, pick_device
from model import Llama
from tokenizer import Tokenizer


@dataclasses.dataclass
class Scorer:
    """A checkpoint ready to score."""
    model: Llama
    tokenizer: Tokenizer
    window: int

    def encode(self, text: str) -> list[int]:
        """The text's tokens alone, no special tokens."""
        return self.tokenizer.encode(text)


def load_scorer(cfg: EvalConfig) -> Scorer:
    if cfg.checkpoint is None:
        raise ConfigError("no checkpoint given: python eval.py CHECKPOINT --eval.data FILE (or --eval.task TASK)")
    device, dtype = pick_device(cfg)
    model, folder = checkpoint.load_model(cfg.checkpoint, dtype)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ConfigError(f"{cfg.checkpoint} has no tokenizer.json, and eval.py scores text: use a checkpoint "
                          f"that carries its tokenizer")
    trained = checkpoint.trained_context(folder) or model.cfg.max_seq_len
    window = min(cfg.window or trained, model.cfg.max_seq_len)
    return Scorer(model.to(device).eval(), tokenizer, window)


# ---------------------------------------------------------------------------------------------
# Perplexity and bits per byte


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) of each window over tokens[begin:end]: it scores the tokens at
    positions first_scored..end-1, so positions 1..n-1 are each scored once, and every window but a
    short text's only one holds `window` tokens."""
    spans, scored, end = [], 1, min(window, n_tokens)
    while True:
        spans.append((max(0, end - window), end, scored))
        if end == n_tokens:
            return spans
        scored, end = end, min(end + stride, n_tokens)


def sum_nll(model: Llama, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the targets (-100 = not scored) of a batch of windows."""
    logits = model(tokens)[0].float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")


def score_text(scorer: Scorer, text: str, stride: int, batch_size: int) -> dict[str, float]:
    """Loss (nats per token), perplexity and bits per byte of `text`, every token scored once."""
    return score_ids(scorer, *document(scorer, text), stride, batch_size)


def document(scorer: Scorer, text: str) -> tuple[list[int], int]:
    """(the text's ids as its tokenizer poses a document, the bytes of text its scored tokens hold)."""
    ids = scorer.tokenizer.encode_document(text)
    # The first token is never scored: a BOS holds no text, a text token's bytes leave the count.
    unscored = len(scorer.tokenizer.decode(ids[:1], skip_special=True).encode())
    return ids, len(text.encode()) - unscored


def text_spans(scorer: Scorer, n_tokens: int, stride: int) -> list[tuple[int, int, int]]:
    """The scoring windows of a text of n_tokens (stride 0: half the window)."""
    if n_tokens < 2:
        raise UserError(f"the text holds {n_tokens} token(s): at least two are needed to predict one from another")
    return window_spans(n_tokens, scorer.window, stride or max(1, scorer.window // 2))


def windows_nll(scorer: Scorer, ids: Sequence[int], spans: Sequence[tuple[int, int, int]],
                batch_size: int) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) over the given windows of `ids`."""
    device = scorer.model.embed_tokens.weight.device
    total, count = 0.0, 0
    with torch.inference_mode(), tqdm(total=len(spans), desc="windows", unit="window", disable=None) as bar:
        for lengths in sorted({end - begin for begin, end, _ in spans}):  # one batch shape per window length
            same = [s for s in spans if s[1] - s[0] == lengths]
            for i in range(0, len(same), batch_size):
                batch = same[i:i + batch_size]
                tokens = torch.tensor([ids[b:e] for b, e, _ in batch], device=device)
                targets = torch.full_like(tokens, -100)
                for row, (b, e, first) in enumerate(batch):
                    targets[row, first - b - 1:e - b - 1] = tokens.new_tensor(ids[first:e])
                total += sum_nll(scorer.model, tokens, targets).item()
                count += int((targets != -100).sum())
                bar.update(len(batch))
    return total, count


def score_ids(scorer: Scorer, ids: Sequence[int], n_bytes: int | None, stride: int,
              batch_size: int) -> dict[str, float]:
    """score_text for tokens already made: every token after the first scored once, over n_bytes
    bytes of text (default: what the scored tokens decode to)."""
    spans = text_spans(scorer, len(ids), stride)
    total, count = windows_nll(scorer, ids, spans, batch_size)
    if n_bytes is None:
        n_bytes = len(scorer.tokenizer.decode(ids[1:], skip_special=True).encode())
    return {"tokens": count, "bytes": n_bytes, "loss": total / count, "perplexity": math.exp(total / count),
            "bits_per_byte": total / math.log(2) / n_bytes, "window": scorer.window,
            "stride": stride or max(1, scorer.window // 2)}


# ---------------------------------------------------------------------------------------------
# Multiple choice


@dataclasses.dataclass
class Example:
    context: str
    choices: list[str]
    label: int


def hellaswag_text(text: str) -> str:
    """lm-evaluation-harness's cleanup of HellaSwag's WikiHow text: '[title]' becomes a sentence
    break, other bracketed tags go, double spaces close up."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_example(row: dict) -> Example:
    """A row of HellaSwag's jsonl as lm-evaluation-harness poses it: activity label, then both
    halves of the context with the second capitalized."""
    context = hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Example(context, [hellaswag_text(e) for e in row["endings"]], int(row["label"]))


# HellaSwag's validation split at a fixed commit of its repository, checked against the id git
# gives the file in that commit's tree: the only checksum the project publishes (no sha256).
HELLASWAG_COMMIT = "a29ff8e9a04bba4bd6588223785ce105328adc57"
HELLASWAG_URL = f"https://raw.githubusercontent.com/rowanz/hellaswag/{HELLASWAG_COMMIT}/data/hellaswag_val.jsonl"
HELLASWAG_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"


def hellaswag_file(cfg: EvalConfig) -> Path:
    """--eval.source as given (your own copy, offline), or the official file, downloaded once into
    data/downloads/ and verified."""
    if cfg.source is not None:
        return Path(cfg.source)
    try:
        return prepare_data.fetch(HELLASWAG_URL, Path("data") / "downloads", HELLASWAG_BLOB, "git blob sha1")
    except UserError as e:
        raise UserError(f"{e} (offline: pass a copy of hellaswag_val.jsonl with --eval.source)") from None


def read_examples(cfg: EvalConfig) -> tuple[str, list[Example]]:
    """(task name, examples) for cfg.task; every row checked, a bad one named by its line."""
    hellaswag = cfg.task == "hellaswag"
    path = hellaswag_file(cfg) if hellaswag else Path(cfg.task)
    if not hellaswag and path.suffix != ".jsonl":
        raise ConfigError(f"eval.task={cfg.task!r} is not a known task: use hellaswag or a .jsonl file of "
                          f"{{\"context\", \"choices\", \"label\"}} rows")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
            example = hellaswag_example(row) if hellaswag else Example(row["context"], row["choices"], row["label"])
        except json.JSONDecodeError:
            raise UserError(f"{where} is not JSON") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{where} lacks a field or has one of the wrong type ({e}): each row needs "
                            f"{'ctx_a, ctx_b, activity_label, endings, label' if hellaswag else 'context, choices, label'}") from None
        if not (isinstance(example.choices, list) and len(example.choices) >= 2
                and all(isinstance(c, str) for c in example.choices) and isinstance(example.context, str)):
            raise UserError(f"{where} needs a context string and at least two choice strings")
        if not (isinstance(example.label, int) and 0 <= example.label < len(example.choices)):
            raise UserError(f"{where} has label {example.label!r}: it must index its {len(example.choices)} choices")
        examples.append(example)
        if cfg.limit and len(examples) == cfg.limit:
            break
    if not examples:
        raise UserError(f"{path} holds no examples")
    return ("hellaswag" if hellaswag else path.stem), examples


def choice_requests(scorer: Scorer, example: Example) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per choice: context + " " + choice tokenized whole, split
    where the context's own tokens end (how lm-evaluation-harness keeps merges across the seam).
    No special tokens, as its hf backend by default, except BOS (or else EOS) before an empty context."""
    context = scorer.encode(example.context)
    bos = scorer.tokenizer.bos_id
    start = [bos] if not context and bos is not None else []
    if not context and not start:
        raise UserError("an example has an empty context and the checkpoint no BOS token to start from")
    requests = []
    for choice in example.choices:
        whole = scorer.encode(f"{example.context} {choice}")
        requests.append((start + whole[:len(context)], whole[len(context):]))
    return requests


def logliks(scorer: Scorer, requests: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Summed log-probability of each continuation after its context, the context cut from the left
    when the pair exceeds the window."""
    device = scorer.model.embed_tokens.weight.device
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(requests), batch_size), desc="choices", unit="batch", disable=None):
            batch = [(ctx + cont)[-(scorer.window + 1):] for ctx, cont in requests[i:i + batch_size]]
            n_cont = [len(cont) for _, cont in requests[i:i + batch_size]]
            longest = max(map(len, batch)) - 1
            tokens = torch.tensor([seq[:-1] + [0] * (longest - len(seq) + 1) for seq in batch], device=device)
            logprobs = scorer.model(tokens)[0].float().log_softmax(-1)
            for row, (seq, n) in enumerate(zip(batch, n_cont)):
                positions = torch.arange(len(seq) - 1 - n, len(seq) - 1, device=device)
                targets = torch.tensor(seq[-n:], device=device)
                out.append(logprobs[row, positions, targets].sum().item())
    return out


def score_choices(scorer: Scorer, examples: Sequence[Example], batch_size: int) -> dict:
    """acc and acc_norm over the examples, with each example's log-likelihoods."""
    per_example = example_scores(scorer, examples, batch_size)
    n = len(per_example)
    return {"examples": n, "acc": sum(e["acc"] for e in per_example) / n,
            "acc_norm": sum(e["acc_norm"] for e in per_example) / n, "per_example": per_example}


def example_scores(scorer: Scorer, examples: Sequence[Example], batch_size: int) -> list[dict]:
    """Each example's log-likelihoods, acc and acc_norm. All choices of all examples are scored
    longest first, so a batch holds sequences of similar length."""
    requests = [choice_requests(scorer, example) for example in examples]
    for example, pairs in zip(examples, requests):
        if any(not cont for _, cont in pairs):
            raise UserError(f"a choice of the example '{example.context[:40]}...' tokenizes to nothing after its context")
    flat = [(i, j) for i, pairs in enumerate(requests) for j in range(len(pairs))]
    flat.sort(key=lambda ij: -sum(map(len, requests[ij[0]][ij[1]])))
    scores = dict(zip(flat, logliks(scorer, [requests[i][j] for i, j in flat], batch_size)))
    per_example = []
    for i, example in enumerate(examples):
        lls = [scores[i, j] for j in range(len(example.choices))]
        per_char = [ll / len(choice) for ll, choice in zip(lls, example.choices)]
        per_example.append({"logliks": lls, "label": example.label,
                            "acc": float(max(range(len(lls)), key=lls.__getitem__) == example.label),
                            "acc_norm": float(max(range(len(lls)), key=per_char.__getitem__) == example.label)})
    return per_example


# ---------------------------------------------------------------------------------------------
# Command line


@script
def main(argv: list[str]) -> None:
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".toml"):
        argv = ["--eval.checkpoint", argv[0], *argv[1:]]  # the checkpoint as the first argument
    run(parse_cli(argv, prog="eval.py", sections=("eval",)).eval)


def harness_task_yaml(name: str, jsonl: str | Path) -> str:
    """An lm-evaluation-harness task (YAML) posing a {context, choices, label} jsonl file as
    eval.py poses it: multiple choice, acc and acc_norm. Put it in a folder and pass that folder
    as lm_eval's --include_path to score the same task with the harness."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"eval.data={path} is not a file: give a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def dataset_ids(folder: str | Path, scorer: Scorer) -> list[int]:
    """The validation split of a folder prepare_data.py wrote, refused when another tokenizer made it."""
    val = data.open_split(folder, "val")
    if val.tokenizer_hash != scorer.tokenizer.hash:
        raise UserError(f"{val.path} was tokenized with another tokenizer than the checkpoint's (sha256 "
                        f"{val.tokenizer_hash[:12]} vs {scorer.tokenizer.hash[:12]}): score a text file instead, "
                        f"or the dataset the checkpoint was trained on")
    return [t for f in val.files for t in f.tokens.tolist()]  # the shards in order, as one text


@dataclasses.dataclass
class TrainingEval:
    """eval.data and eval.task read and tokenized once, for train.py to score its live weights at
    every evaluation."""
    scorer: Scorer
    cfg: EvalConfig
    text: tuple[list[int], int] | None  # document(): ids and scored bytes
    task: tuple[str, list[Example]] | None

    def scores(self, rank: int = 0, world: int = 1,
               all_sum: Callable[[list[float]], list[float]] = lambda sums: sums) -> dict[str, float]:
        """text_loss and text_bits_per_byte, <task>_acc and <task>_acc_norm: flat, for a metrics
        record. Under torchrun every process scores its share (every world-th window and example)
        and `all_sum` adds the processes' sums, so all of them return the numbers one process would."""
        out = {}
        if self.text is not None:
            ids, n_bytes = self.text
            spans = text_spans(self.scorer, len(ids), self.cfg.stride)[rank::world]
            total, count = all_sum(list(windows_nll(self.scorer, ids, spans, self.cfg.batch_size)))
            out |= {"text_loss": total / count, "text_bits_per_byte": total / math.log(2) / n_bytes}
        if self.task is not None:
            name, examples = self.task
            mine = example_scores(self.scorer, examples[rank::world], self.cfg.batch_size)
            acc, acc_norm, n = all_sum([sum(e["acc"] for e in mine), sum(e["acc_norm"] for e in mine), len(mine)])
            out |= {f"{name}_acc": acc / n, f"{name}_acc_norm": acc_norm / n}
        return out


def training_eval(cfg: EvalConfig, model: Llama, tokenizer: Tokenizer, window: int) -> TrainingEval | None:
    """What train.py scores at each evaluation besides its val loss (None: eval.data and eval.task unset)."""
    if cfg.data is None and cfg.task is None:
        return None
    scorer = Scorer(model, tokenizer, min(cfg.window or window, window))
    text = document(scorer, read_text(cfg.data)) if cfg.data is not None else None
    task = read_examples(cfg) if cfg.task is not None else None
    return TrainingEval(scorer, cfg, text, task)


def run(cfg: EvalConfig) -> dict:
    if cfg.data is None and cfg.task is None:
        raise ConfigError("nothing to score: give --eval.data FILE (perplexity) and/or --eval.task TASK (multiple choice)")
    scorer = load_scorer(cfg)
    results: dict = {"checkpoint": cfg.checkpoint}
    if cfg.data is not None and Path(cfg.data).is_dir():
        results["text"] = {"file": cfg.data, **score_ids(scorer, dataset_ids(cfg.data, scorer), None, cfg.stride,
                                                         cfg.batch_size)}
    elif cfg.data is not None:
        text = read_text(cfg.data)
        results["text"] = {"file": cfg.data, **score_text(scorer, text, cfg.stride, cfg.batch_size)}
    if cfg.task is not None:
        name, examples = read_examples(cfg)
        results["task"] = {"name": name, **score_choices(scorer, examples, cfg.batch_size)}
    print_results(results)
    if cfg.json:
        replace_file(Path(cfg.json), json.dumps(results, indent=2), "the scores are printed above: free disk space "
                     "(or make the folder writable) and score again to keep them")
    return results


def print_results(results: dict) -> None:
    if text := results.get("text"):
        print(f"| text | tokens | loss | perplexity | bits/byte | window / stride |\n|---|---:|---:|---:|---:|---:|\n"
              f"| {text['file']} | {text['tokens']:,} | {text['loss']:.4f} | {text['perplexity']:.3f} | "
              f"{text['bits_per_byte']:.4f} | {text['window']} / {text['stride']} |")
    if task := results.get("task"):
        print(f"| task | examples | acc | acc_norm |\n|---|---:|---:|---:|\n"
              f"| {task['name']} | {task['examples']:,} | {task['acc']:.4f} | {task['acc_norm']:.4f} |")
    summary = {k: ({kk: vv for kk, vv in v.items() if kk != "per_example"} if isinstance(v, dict) else v)
               for k, v in results.items()}
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
