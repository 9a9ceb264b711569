"""Data-preparation throughput and memory: prepare_data.py on a large synthetic corpus, 1 vs 2 workers.

    python bench/prepare_speed.py [--size_mb 200 [2000 ...]] [--workers 1 2] [--tokenizer bpe] [--rounds 1]
                                  [--shard_documents N] [--source ../shared/data/tinyshakespeare.txt]
                                  [--workdir DIR] [--keep] [--json out.json]

The corpus: the non-empty lines of Tiny Shakespeare, shuffled with a fixed seed on every pass and
repeated until --size_mb megabytes (10^6 bytes), cut into documents of DOC_LINES lines written to one
.txt file between `<|endoftext|>` lines, the many-document path that prepare_data.py streams (one
document in memory at a time, every 1/val_fraction-th document to val). The same seed and size give
the same bytes; its sha256 is in the output.

Each worker count runs the real CLI in its own process, `prepare_data.py --data.input corpus.txt
--data.tokenizer bpe --data.workers N` (char with --tokenizer char), the other data.* settings at
their defaults, and is timed from launch to exit (interpreter start, tokenizer training,
tokenizing, writing the .bin files). The tokenizing phase is timed separately: it starts when the
tokenizer is saved (prepare_data.py writes tokenizer.json into <dataset>.tmp/ just before it starts
the worker pool) and ends at exit; only this phase uses the workers. tokens/s counts train + val
tokens from meta.json. Rounds alternate the order of worker counts; medians are reported.

Memory: every 50 ms the process tree (prepare_data.py, its pool workers and multiprocessing's
resource tracker) is read from /proc, and the peak of the sum of its members' VmRSS is reported.
Summing RSS counts shared pages (libraries, the interpreter) once per process, so this overstates
the true footprint a little, which is the safe direction for a bound. Also reported: the VmHWM of
prepare_data.py itself and of the largest process (the kernel's own peak, which only the last 50 ms
before an exit can hide from the sampler) and the sum of every member's VmHWM, an upper bound on the
tree's peak even between samples. The run fails (exit 1) when the sampled tree peak exceeds
--max_rss_mb (1 GiB by default).

CPU use is user + system seconds of the whole tree (getrusage of waited-for children) over the wall
time: how many of the machine's cores the run kept busy. Every worker count must write identical
token files (train.bin and val.bin, or every shard with --shard_documents); the output says whether
they did.

Several --size_mb values run every worker count on a corpus of each size (the same seed, so the
smaller is a prefix of the larger's text in distribution, not in bytes) and report how much the
peak RSS grew from the smallest to the largest corpus; the run fails (exit 1) when it grew by more
than --max_rss_growth_mb (100 MiB by default): preparation's memory must not follow the corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import DataConfig  # noqa: E402
from data import read_tokens  # noqa: E402
from prepare_data import DOC_SEPARATOR, sha256_of  # noqa: E402

DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
DOC_LINES = 40  # ~1.2 KB of verse per document: a short-story-sized document, as in TinyStories
POLL_S = 0.05
MiB = 1 << 20


def build_corpus(source: Path, path: Path, size_bytes: int, seed: int) -> int:
    """Write the synthetic corpus to `path`; returns its number of documents."""
    # Blank lines carry no text and would shuffle into runs of empty lines; every kept line ends in
    # a newline so that no two lines fuse when the last line of the file lacks one.
    lines = [line.rstrip("\n") + "\n" for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        sys.exit(f"error: {source} has no text to build a corpus from")
    rng = random.Random(seed)
    written = documents = 0
    with path.open("w", encoding="utf-8", newline="") as f:
        while written < size_bytes:
            rng.shuffle(lines)  # a new order on every pass, so documents do not repeat whole
            for start in range(0, len(lines), DOC_LINES):
                chunk = "".join(lines[start:start + DOC_LINES]) + DOC_SEPARATOR + "\n"
                f.write(chunk)
                written += len(chunk.encode())
                documents += 1
                if written >= size_bytes:
                    break
    return documents


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants. Kernels built without CONFIG_PROC_CHILDREN (this project's
    machines) have no /proc/<pid>/task/<tid>/children, so parents are read from every /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited between the listing and the read
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    tree = [root]
    for pid in tree:  # grows while it is walked: breadth first over the descendants
        tree.extend(children.get(pid, []))
    return tree


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB, or None when the process is gone or is a zombie without memory."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM")))
    if "VmRSS" not in fields:
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@dataclass
class TreeMemory:
    """What the sampler saw of one process tree."""
    peak_sum_rss_kib: int = 0
    peak_processes: int = 0
    hwm_kib: dict[int, int] = field(default_factory=dict)  # pid -> the last VmHWM read (it only grows)

    def sample(self, root: int) -> None:
        total = count = 0
        for pid in process_tree(root):
            if (mem := memory_kib(pid)) is not None:
                total += mem[0]
                count += 1
                self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), mem[1])
        if total > self.peak_sum_rss_kib:
            self.peak_sum_rss_kib, self.peak_processes = total, count


def run_prepare(corpus: Path, data_dir: Path, dataset: str, workers: int, tokenizer: str, shard_documents: int,
                log: Path) -> dict:
    """One prepare_data.py run: its timings, memory, CPU use and meta.json."""
    cmd = [sys.executable, str(ROOT / "prepare_data.py"), "--data.input", str(corpus), "--data.dataset", dataset,
           "--data.data_dir", str(data_dir), "--data.tokenizer", tokenizer, "--data.workers", str(workers),
           "--data.shard_documents", str(shard_documents)]
    # Shards are written straight into the dataset folder, an unsharded dataset into <dataset>.tmp/.
    tokenizer_file = data_dir / (dataset if shard_documents else f"{dataset}.tmp") / "tokenizer.json"
    memory, done = TreeMemory(), threading.Event()
    tokenizer_saved: list[float] = []

    def sampler(pid: int) -> None:
        while not done.is_set():
            memory.sample(pid)
            if not tokenizer_saved and tokenizer_file.exists():
                tokenizer_saved.append(time.perf_counter())
            done.wait(POLL_S)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:  # the tqdm bars and the summary go to a log, not into the table
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        thread = threading.Thread(target=sampler, args=(proc.pid,))
        thread.start()
        returncode = proc.wait()
        end = time.perf_counter()
        done.set()
        thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"error: prepare_data.py exited with status {returncode}: {' | '.join(tail)} (log: {log})")
    out_dir = data_dir / dataset
    meta = json.loads((out_dir / "meta.json").read_text())
    files = []
    for split in ("train", "val"):  # the headers' counts must match meta.json and the files' lengths
        split_files = ([out_dir / e["file"] for e in meta["shards"][split]] if "shards" in meta
                       else [out_dir / f"{split}.bin"])
        if sum(len(read_tokens(f)) for f in split_files) != meta[f"{split}_tokens"]:
            sys.exit(f"error: the {split} files of {out_dir} do not hold meta.json's {split}_tokens")
        files += split_files
    digest = hashlib.sha256(b"".join(bytes.fromhex(sha256_of(f)) for f in files))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": end - start, "tokenize_s": end - tokenizer_saved[0] if tokenizer_saved else None,
            "cpu_s": cpu, "tokens": meta["train_tokens"] + meta["val_tokens"], "meta": meta,
            "bins_sha256": digest.hexdigest(),
            "peak_tree_rss_bytes": memory.peak_sum_rss_kib * 1024, "processes_at_peak": memory.peak_processes,
            "parent_hwm_bytes": memory.hwm_kib.get(proc.pid, 0) * 1024,
            "max_process_hwm_bytes": max(memory.hwm_kib.values(), default=0) * 1024,
            "sum_process_hwm_bytes": sum(memory.hwm_kib.values()) * 1024}


def summarize(workers: int, runs: list[dict]) -> dict:
    """Medians of the timings over rounds; the worst memory of any round."""
    tokens = runs[0]["tokens"]
    wall = statistics.median(r["wall_s"] for r in runs)
    tokenize = [r["tokenize_s"] for r in runs if r["tokenize_s"] is not None]
    tokenize_s = statistics.median(tokenize) if len(tokenize) == len(runs) else None
    return {"workers": workers, "rounds": len(runs), "wall_s": round(wall, 2),
            "tokenize_s": None if tokenize_s is None else round(tokenize_s, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / wall),
            "tokenize_tokens_per_s": None if tokenize_s is None else round(tokens / tokenize_s),
            "cpu_cores_busy": round(statistics.median(r["cpu_s"] / r["wall_s"] for r in runs), 2),
            **{key: max(r[key] for r in runs) for key in ("peak_tree_rss_bytes", "parent_hwm_bytes",
                                                           "max_process_hwm_bytes", "sum_process_hwm_bytes")},
            "processes_at_peak": max(r["processes_at_peak"] for r in runs),
            "bins_sha256": sorted({r["bins_sha256"] for r in runs})}


def print_report(result: dict) -> None:
    corpus, rows = result["corpus"], result["rows"]
    print(f"\ncorpus: {corpus['bytes'] / 1e6:,.0f} MB, {corpus['documents']:,} documents of {DOC_LINES} shuffled "
          f"lines of {corpus['source']} (seed {corpus['seed']}, sha256 {corpus['sha256'][:12]})")
    merges = f", merges learned from {result['bpe_train_bytes'] / 1e6:,.0f} MB" if result["tokenizer"] == "bpe" else ""
    shards = f", shards of {result['shard_documents']:,} documents" if result["shard_documents"] else ""
    print(f"prepare_data.py: {result['tokenizer']} tokenizer, {result['vocab_size']:,} ids{merges}{shards} | "
          f"{rows[0]['tokens']:,} tokens | {result['cpus']} CPU cores")
    base = rows[0]

    def speedup(row: dict, key: str) -> str:
        return "-" if row[key] is None or base[key] is None else f"{row[key] / base[key]:.2f}x"

    print("\n| workers | wall time | tokenizing | tokens/s | tokens/s tokenizing | speed-up (all / tokenizing) "
          "| CPU cores busy | peak RSS (tree) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tokenize = "-" if r["tokenize_s"] is None else f"{r['tokenize_s']:.1f} s"
        tokenize_rate = "-" if r["tokenize_tokens_per_s"] is None else f"{r['tokenize_tokens_per_s']:,}"
        print(f"| {r['workers']} | {r['wall_s']:.1f} s | {tokenize} | {r['tokens_per_s']:,} | {tokenize_rate} | "
              f"{speedup(r, 'tokens_per_s')} / {speedup(r, 'tokenize_tokens_per_s')} | {r['cpu_cores_busy']:.2f} | "
              f"{r['peak_tree_rss_bytes'] / MiB:,.0f} MiB |")
    for r in rows:
        print(f"workers {r['workers']}: peak of the sampled sum of VmRSS {r['peak_tree_rss_bytes'] / MiB:,.0f} MiB "
              f"over {r['processes_at_peak']} processes; VmHWM of prepare_data.py itself "
              f"{r['parent_hwm_bytes'] / MiB:,.0f} MiB, of the largest process "
              f"{r['max_process_hwm_bytes'] / MiB:,.0f} MiB; sum of every process's VmHWM "
              f"{r['sum_process_hwm_bytes'] / MiB:,.0f} MiB")
    print(f"identical token files for every worker count: {'yes' if result['identical_output'] else 'NO'}")
    print(f"peak RSS under {result['max_rss_bytes'] / MiB:,.0f} MiB: {'yes' if result['rss_within_bound'] else 'NO'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, nargs="+", default=[200], help="corpus sizes in MB (10^6 bytes)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data.workers values to compare")
    parser.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe", help="data.tokenizer")
    parser.add_argument("--shard_documents", type=int, default=0, help="data.shard_documents (0: no shards)")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="text whose lines make the corpus")
    parser.add_argument("--seed", type=int, default=0, help="seed of the line shuffles")
    parser.add_argument("--rounds", type=int, default=1, help="runs per worker count (medians are reported)")
    parser.add_argument("--max_rss_mb", type=float, default=1024, help="fail when the tree's peak RSS exceeds "
                                                                      "this many MiB")
    parser.add_argument("--max_rss_growth_mb", type=float, default=100, help="fail when the peak RSS on the "
                        "largest corpus exceeds the one on the smallest by this many MiB")
    parser.add_argument("--workdir", type=Path, help="where the corpus and prepared data go (default: a new "
                                                     "temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the corpus, prepared data and logs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if min(args.size_mb) <= 0 or args.rounds < 1 or min(args.workers) < 1 or args.shard_documents < 0:
        parser.error("--size_mb, --rounds and every --workers value must be positive, --shard_documents not negative")
    if not args.source.is_file():
        parser.error(f"--source {args.source} does not exist: pass the Tiny Shakespeare text (or any UTF-8 text)")
    return args


def measure(args: argparse.Namespace, size_mb: float, corpus: Path, data_dir: Path) -> dict:
    """Every worker count on a corpus of `size_mb`: the result of one size."""
    start = time.perf_counter()
    documents = build_corpus(args.source, corpus, int(size_mb * 1e6), args.seed)
    print(f"built {corpus} ({corpus.stat().st_size / 1e6:,.1f} MB, {documents:,} documents) in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for round_ in range(args.rounds):
        # Alternate the order so that a machine getting busier or a warmer page cache does not
        # always favour the same worker count.
        for workers in args.workers if round_ % 2 == 0 else args.workers[::-1]:
            dataset = f"synthetic_w{workers}"
            run = run_prepare(corpus, data_dir, dataset, workers, args.tokenizer, args.shard_documents,
                              corpus.parent / f"{dataset}.log")
            runs[workers].append(run)
            print(f"{size_mb:g} MB, round {round_ + 1}, workers {workers}: {run['wall_s']:.1f}s, "
                  f"{run['peak_tree_rss_bytes'] / MiB:,.0f} MiB", file=sys.stderr)
            if not args.keep:  # the token files of a 200 MB corpus are ~100 MB per run
                shutil.rmtree(data_dir / dataset)
    rows = [summarize(w, r) for w, r in runs.items()]
    meta, defaults = runs[args.workers[0]][0]["meta"], DataConfig()
    max_rss = int(args.max_rss_mb * MiB)
    return {"corpus": {"source": str(args.source), "seed": args.seed, "bytes": corpus.stat().st_size,
                       "documents": documents, "doc_lines": DOC_LINES, "sha256": meta["source_sha256"]},
            "tokenizer": args.tokenizer, "vocab_size": meta["vocab_size"], "shard_documents": args.shard_documents,
            "bpe_train_bytes": defaults.bpe_train_bytes, "val_fraction": defaults.val_fraction,
            "cpus": len(os.sched_getaffinity(0)), "rows": rows,
            "identical_output": len({h for r in rows for h in r["bins_sha256"]}) == 1,
            "max_rss_bytes": max_rss, "rss_within_bound": all(r["peak_tree_rss_bytes"] <= max_rss for r in rows)}


def rss_growth(results: list[dict]) -> dict[int, int]:
    """Per worker count, the peak RSS on the largest corpus minus the one on the smallest, in bytes."""
    by_size = sorted(results, key=lambda r: r["corpus"]["bytes"])
    smallest, largest = by_size[0], by_size[-1]
    return {a["workers"]: b["peak_tree_rss_bytes"] - a["peak_tree_rss_bytes"]
            for a, b in zip(smallest["rows"], largest["rows"])}


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="prepare_speed_"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, data_dir = workdir / "corpus.txt", workdir / "data"
    finished = False
    try:
        results = []
        for size_mb in args.size_mb:
            results.append(measure(args, size_mb, corpus, data_dir))
            print_report(results[-1])
        growth = rss_growth(results)
        growth_ok = len(results) == 1 or max(growth.values()) <= args.max_rss_growth_mb * MiB
        if len(results) > 1:
            print("\npeak RSS growth from the smallest to the largest corpus: " + ", ".join(
                f"{w} worker(s) {g / MiB:+,.0f} MiB" for w, g in growth.items()) +
                f" (bound {args.max_rss_growth_mb:,.0f} MiB: {'yes' if growth_ok else 'NO'})")
        summary = {"sizes": results, "rss_growth_bytes": growth, "rss_growth_within_bound": growth_ok}
        print(json.dumps(summary))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
        finished = True
    finally:
        if args.keep or not finished:  # a failed run's logs and files are what explains it
            print(f"kept {workdir}", file=sys.stderr)
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # a folder the user named: remove only what this run put there
            corpus.unlink(missing_ok=True)
            shutil.rmtree(data_dir, ignore_errors=True)
            for log in workdir.glob("synthetic_w*.log"):
                log.unlink()
    sys.exit(0 if growth_ok and all(r["rss_within_bound"] for r in results) else 1)


if __name__ == "__main__":
    main()
