"""The README, bench/ and docs/ pages are runnable: every command in their ```bash blocks runs.

A command that names a path under out/ reads a run: it runs for real, with the tool it names, on
tiny runs made at those paths (test_command_on_a_run); lm_eval, which is optional and downloads its
tasks, is checked by loading its `pretrained=` path as its `hf` model does, with transformers'
AutoModelForCausalLM and AutoTokenizer.

Any other command cannot do its real work here (train, download, serve), so each runs in the form that
checks everything but the work: train.py, model.py, generate.py, app.py and prepare_data.py take
the same arguments plus --print-config (config.parse_cli validates the TOML file and every override,
prints the resolved config and exits 0); sweep.py runs with --dry-run (which builds and validates
every trial, in a scratch folder holding a tiny prepared dataset, since it checks each trial's
data); convert.py and the benchmarks with --help. The install, quickstart and test-suite lines are
CI's own steps (.ci/run) and are skipped by name, so a command of any other form fails here until
this file learns how to check it. The ```python blocks must compile, and every relative
link must point at a file that exists (and, with an #anchor, at a heading of that file).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# The front door first, then every page it hands the detail to: the same checks on all of them.
PAGES = [ROOT / "README.md", *sorted((ROOT / "bench").glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]

# The exact line CI's .ci/run executes as "the README's test command".
TEST_COMMAND = ("python3 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt "
                "&& .venv/bin/python -m pytest")
CONFIG_SCRIPTS = {"train.py", "model.py", "generate.py", "app.py", "prepare_data.py", "eval.py"}
HELP_SCRIPTS = {"convert.py", "bench/train_speed.py", "bench/generate_speed.py", "bench/decode_scaling.py", "bench/speculative_speed.py", "bench/eval_speed.py", "bench/lora_memory.py", "bench/chat_latency.py", "bench/serve_load.py", "bench/prepare_speed.py", "bench/pretrain_speed.py",
                "bench/speedrun.py", "bench/sweep_efficiency.py"}
# Forms run by CI itself (.ci/run) or feeding another command's stdin: skipped, but only these.
SKIPPED_FORMS = {"quickstart", "pip install", "test command", "stdin feeder", "lm_eval", "hub download"}
FENCE_LANGUAGES = {"bash", "python", "text", "yaml", "toml", ""}  # a ```sh block would escape the checks


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every ``` block of a markdown page."""
    return re.findall(r"^```(\S*)\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def command_lines(page: Path) -> list[str]:
    """Every command line of the page's ```bash blocks, continuations joined, blanks and comment-only
    lines dropped (parse one with words())."""
    lines = []
    for language, body in fenced_blocks(page):
        if language == "bash":
            lines += [line.strip() for line in body.replace("\\\n", " ").splitlines() if words(line)]
    return lines


def words(line: str) -> list[str]:
    """A command line as the shell splits it, its comment dropped."""
    return shlex.split(line, comments=True)


def segments(argv: list[str]) -> list[list[str]]:
    """A command line cut at |, && and ; into the commands it runs."""
    parts: list[list[str]] = [[]]
    for word in argv:
        if word in ("|", "&&", ";"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [p for p in parts if p]


def classify(line: str) -> list[tuple[str, list[str] | None]]:
    """(form, argv to run or None when skipped) for each command of a line; form 'unknown' fails."""
    if words(line) == words(TEST_COMMAND):
        return [("test command", None)]
    out = []
    parts = segments(words(line))
    for i, argv in enumerate(parts):
        while argv and (argv[0] == "time" or re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0])):
            argv = argv[1:]  # `time ...`, `VAR=value ...`
        if not argv:
            out.append(("unknown", None))
            continue
        head, rest = argv[0], argv[1:]
        if head == "bash" and rest[:1] == ["quickstart.sh"]:
            out.append(("quickstart", None))
        elif head == "pip" and rest[:1] == ["install"]:
            out.append(("pip install", None))
        elif head == "lm_eval":  # the optional harness; its tasks download from the Hugging Face Hub
            out.append(("lm_eval", None))
        elif head == "huggingface-cli" and rest[:1] == ["download"]:  # the user's own download of a model
            out.append(("hub download", None))
        elif head == "echo" and i + 1 < len(parts):
            out.append(("stdin feeder", None))
        elif head in ("python", "python3") and rest and rest[0].endswith(".py"):
            out.append(script_check(rest[0], rest[1:]))
        elif head == "torchrun":
            script = next((j for j, w in enumerate(rest) if w.endswith(".py")), None)
            out.append(("unknown", None) if script is None else script_check(rest[script], rest[script + 1:]))
        else:
            out.append(("unknown", None))
    return out


def script_check(script: str, args: list[str]) -> tuple[str, list[str] | None]:
    if script in CONFIG_SCRIPTS:
        extra = [] if {"--help", "-h", "--print-config"} & set(args) else ["--print-config"]
        return "config script", [script, *args, *extra]
    if script == "sweep.py":
        return "sweep", [script, *args, *([] if "--dry-run" in args else ["--dry-run"])]
    if script in HELP_SCRIPTS:
        return "help", [script, "--help"]
    return "unknown", None


COMMANDS = [(page, line) for page in PAGES for line in command_lines(page)]
RUNS = [(page, line, argv, form) for page, line in COMMANDS for form, argv in classify(line) if argv is not None]


def _id(page: Path, line: str) -> str:
    shown = re.split(r"\s+#", line)[0]  # the comment cut, for display
    return f"{page.relative_to(ROOT)}: {shown[:80]}"


def test_every_command_has_a_known_form():
    unknown = [_id(page, line) for page, line in COMMANDS if any(f == "unknown" for f, _ in classify(line))]
    assert not unknown, f"commands this test cannot check (teach classify() their form): {unknown}"
    skipped = {form for _, line in COMMANDS for form, argv in classify(line) if argv is None}
    assert skipped <= SKIPPED_FORMS, f"new skipped forms {skipped - SKIPPED_FORMS}: check them here instead"
    assert {"quickstart", "test command"} <= skipped, "the README lost one of its two commands"


def test_readme_holds_the_test_command_ci_runs():
    assert words(TEST_COMMAND) in [words(line) for line in command_lines(ROOT / "README.md")]
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()


def readme_section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", (ROOT / "README.md").read_text(), re.S | re.M)[1]


def test_readme_layout_names_every_top_level_module():
    named = set(re.findall(r"^\| `([\w.]+\.py)` \|", readme_section("Layout"), flags=re.M))
    assert named == {p.name for p in ROOT.glob("*.py")}, "README's Layout table and the top-level modules differ"


def test_readme_stays_a_front_door():
    """The README is a front door of about 250 lines: a new capability gets a docs page and a row
    in "What else it does", never more README paragraphs."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 260, "README.md grew past ~250 lines: move the detail to a docs/ page"
    pages = re.findall(r"\]\((docs/\w+\.md)\)", readme_section("What else it does"))
    assert {"docs/finetuning.md", "docs/chat.md", "docs/evaluation.md", "docs/pretraining.md", "docs/serving.md",
            "docs/sweeps.md", "docs/export.md", "docs/configs.md"} <= set(pages)


def test_only_known_fence_languages():
    for page in PAGES:
        for language, _ in fenced_blocks(page):
            assert language in FENCE_LANGUAGES, f"{page.name}: a ```{language} block is neither run nor compiled here"


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A working folder for sweep.py --dry-run, which checks that each trial's data exists: the
    repo's configs and a tiny shakespeare_char dataset prepared from a few lines of text."""
    work = tmp_path_factory.mktemp("sweep")
    (work / "configs").symlink_to(ROOT / "configs")
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 60
    text += "ROMEO:\nDear diary,\n"  # the prompts the pages type, in the char vocabulary
    (work / "tiny.txt").write_text(text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--data.dataset", "shakespeare_char",
                    "--data.source", "tiny.txt", "--data.sha256", sha, "--data.workers", "1"],
                   cwd=work, check=True, capture_output=True, timeout=120)
    return work


@pytest.mark.parametrize("page, line, argv, form", RUNS, ids=[_id(p, line) for p, line, _, _ in RUNS])
def test_command_runs(page, line, argv, form, request):
    # sweep.py reads its data folder relative to the working directory: a prepared stand-in there.
    cwd = request.getfixturevalue("sweep_dir") if form == "sweep" else ROOT
    if form == "sweep":
        argv = [str(ROOT / argv[0]), *argv[1:]]
    result = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-2000:]}"
    if "--print-config" in argv:
        assert tomllib.loads(result.stdout), "--print-config printed no config"


def test_python_blocks_compile():
    blocks = [(page, body) for page in PAGES for language, body in fenced_blocks(page) if language == "python"]
    assert blocks
    for page, body in blocks:
        compile(body, str(page.relative_to(ROOT)), "exec")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file, or #heading in a markdown file, does not exist."""
    broken = []
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # links in code are code
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page  # "#heading": this page's own
        if not file.exists():
            broken.append(f"{page.name} -> {target}")
        elif anchor and file.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), flags=re.M)}
            if anchor not in anchors:
                broken.append(f"{page.name} -> {target} (no such heading)")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert not broken_links(page)


# --- commands that read a run under out/ ---------------------------------------------------------

READERS = {"generate.py", "eval.py", "app.py", "convert.py"}


def run_paths(argv: list[str]) -> list[str]:
    """The paths under out/ a command names (lm_eval's as pretrained=out/...)."""
    return [m[1] for w in argv for m in [re.fullmatch(r"(?:pretrained=)?(out/\S*)", w)] if m]


OUT_COMMANDS = [(page, line, argv) for page in PAGES for line in command_lines(page)
                for argv in segments(words(line)) if run_paths(argv)]


def test_every_command_naming_a_run_is_run_for_real():
    for page, line, argv in OUT_COMMANDS:
        writes = argv[1:2] == ["train.py"] and all(argv[argv.index(p) - 1] == "--train.out_dir" for p in run_paths(argv))
        assert argv[0] == "lm_eval" or argv[1] in READERS or writes, f"{_id(page, line)}: teach test_command_on_a_run"


def make_run(out_dir: Path, tokenizer_folder: Path) -> None:
    """A run folder with one tiny checkpoint carrying the tokenizer of `tokenizer_folder`."""
    import torch

    import checkpoint
    from config import ModelConfig
    from model import Llama
    from tokenizer import Tokenizer
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=Tokenizer.load(tokenizer_folder).vocab_size, dim=32, n_layers=1, n_heads=4,
                              n_kv_heads=2, max_seq_len=64))
    carried = {f.name: f.read_bytes() for f in Tokenizer.files(tokenizer_folder)}
    with checkpoint.writing(out_dir, 1, needed=1_000_000) as folder:
        checkpoint.write_contents(folder, {"step": 1}, "", carried, lambda f: checkpoint.save_hf(model, f, 64))


@pytest.fixture(scope="module")
def runs(sweep_dir) -> Path:
    """sweep_dir with a tiny run at every out/ path a command names (char level, with the prepared
    dataset's tokenizer; a --chat command's with our BPE and its chat template) and the files
    the commands read."""
    from tokenizer import Tokenizer
    chat = sweep_dir / "chat-tokenizer"
    Tokenizer.train_bpe([(sweep_dir / "tiny.txt").read_text()], 300, chat=True).save(chat)
    for _, _, argv in OUT_COMMANDS:
        for path in run_paths(argv):
            run = sweep_dir / Path(path).parts[0] / Path(path).parts[1]
            if not run.exists():
                make_run(run, chat if "--chat" in argv else sweep_dir / "data" / "shakespeare_char")
    (sweep_dir / "notes.txt").write_text("Before we proceed any further, hear me speak.\n")
    (sweep_dir / "my_task.jsonl").write_text(json.dumps({"context": "All:", "choices": [" Speak", " hear"], "label": 0}))
    return sweep_dir


def serves(argv: list[str], cwd: Path) -> None:
    """app.py as the command starts it (on a free port) answers /v1/models."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / argv[1]), *argv[2:], "--port", str(port)], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"{shlex.join(argv)} did not serve: {process.stdout.read() if process.poll() else ''}")
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("page, line, argv", [
    # a compiled command spends its time compiling, which test_decode covers: with the slow tests
    pytest.param(page, line, argv, marks=[pytest.mark.slow] if "--compile" in argv else [])
    for page, line, argv in OUT_COMMANDS], ids=[_id(p, line) for p, line, _ in OUT_COMMANDS])
def test_command_on_a_run(page, line, argv, runs):
    if argv[0] == "lm_eval":  # what its hf model does with pretrained=
        transformers = pytest.importorskip("transformers")
        for path in run_paths(argv):
            transformers.AutoModelForCausalLM.from_pretrained(runs / path)
            transformers.AutoTokenizer.from_pretrained(runs / path)
        return
    if argv[1] not in READERS:
        pytest.skip("writes its run (checked by test_command_runs)")
    if "gguf" in argv:
        pytest.importorskip("gguf")  # the optional GGUF writer
    if argv[1] == "app.py":
        serves(argv, runs)
        return
    extra = ["--max_new_tokens", "8"] if argv[1] == "generate.py" else []
    result = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:], *extra], cwd=runs, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=300)
    if "mps" in argv and not torch.backends.mps.is_available():  # an Apple GPU's command, here: its one-line refusal
        assert result.returncode == 2 and result.stderr.startswith("error: sample.device=mps but this machine has no "
                                                                    "Apple GPU"), result.stderr
        return
    assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-2000:]}"
