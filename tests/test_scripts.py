"""What every script shares: one error path (config.script) and an import graph without loops."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import generate
from checkpoint import save_hf
from config import ConfigError, ModelConfig, UserError, WriteError, script
from model import Llama
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if "__main__" in p.read_text())


def test_a_user_error_is_one_line_and_status_2(capsys):
    @script
    def main(argv: list[str]) -> None:
        raise ConfigError(f"bad thing {argv[0]}: do the other thing")

    assert main(["x"]) == 2
    assert capsys.readouterr().err == "error: bad thing x: do the other thing\n"


def test_success_returns_the_scripts_code():
    assert script(lambda argv: None)([]) == 0
    assert script(lambda argv: 3)([]) == 3


def test_ctrl_c_is_status_130_without_a_traceback(capsys):
    @script
    def main(argv: list[str]) -> None:
        raise KeyboardInterrupt

    assert main([]) == 130 and capsys.readouterr().err == ""


def test_a_bug_keeps_its_traceback():
    @script
    def main(argv: list[str]) -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError, match="a bug"):
        main([])


def test_every_project_error_is_a_user_error():
    import app
    import checkpoint
    import data
    import tokenizer
    for error in (ConfigError, WriteError, data.DataError, tokenizer.TokenizerError, checkpoint.CheckpointError,
                  app.RequestError):
        assert issubclass(error, UserError), error


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_goes_through_the_one_error_path(name):
    """A user mistake in any script: one `error:` line on stderr, status 2, no traceback."""
    args = {"sweep": ["missing.toml"], "convert": ["missing-folder", "out.bin"]}.get(name, ["--model.dimm", "3"])
    result = subprocess.run([sys.executable, f"{name}.py", *args], cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr


def test_a_closed_pipe_ends_quietly():
    """`python generate.py --help | head -0`: the reader is gone before the help is written."""
    process = subprocess.Popen([sys.executable, "generate.py", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and stderr == ""


def test_a_prompt_outside_a_char_vocabulary_is_one_line(tmp_path, capsys):
    tokenizer = Tokenizer.train_char("abc \n")
    save_hf(Llama(ModelConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=16)),
            tmp_path)
    tokenizer.save(tmp_path)
    assert generate.main(["--checkpoint", str(tmp_path), "--prompt", "abz", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "character 'z' (U+007A) is not in this char-level vocabulary" in err


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its code (a function-level import
    closes a loop just as surely as one at the top)."""
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules - {name}
    return graph


def test_the_import_graph_has_no_loops():
    graph = project_imports()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in graph[module]:
            assert state.get(imported) != "open", f"import loop: {' -> '.join(path + [module, imported])}"
            if imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_model_py_holds_only_the_model():
    assert project_imports()["model"] == {"config"}  # no file formats, no checkpoints
