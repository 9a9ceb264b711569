"""Convert a model between our checkpoints, Hugging Face Llama folders, llama2.c's .bin files and
GGUF files for llama.cpp and Ollama.

    python convert.py out/run/ model.bin          # newest checkpoint of a run -> llama2.c (run.c runs it)
    python convert.py stories260K.bin hf-folder/  # llama2.c -> a Hugging Face / nanollama folder
    python convert.py out/run/ --to gguf model.gguf --dtype q8_0   # -> llama.cpp / Ollama (docs/gguf.md)
    python convert.py out/lora-run/ merged/ --merge-lora           # LoRA adapters + base -> one plain folder

The target format follows --to, else the name: NAME.bin is llama2.c, NAME.gguf is GGUF, anything
else a Hugging Face folder. --dtype (f32, f16 or q8_0; default f32) sets GGUF's matrix type.
A folder written is a complete model folder: the source's tokenizer files, chat template,
generation_config.json and trained context come along byte for byte (a llama2.c .bin has none,
and the command says so); it must be new, never written over.
A LoRA checkpoint (adapters only) is read as its base model with the adapters merged in; with
--merge-lora, a source that is not one is refused. The formats themselves live in checkpoint.py
and llamacpp.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import checkpoint
from config import ConfigError, disk_write, script

USAGE = ("usage: python convert.py SRC DST [--to hf|llama2c|gguf] [--dtype f32|f16|q8_0] [--merge-lora] (SRC: a "
         "checkpoint, run or Hugging Face folder or a llama2.c .bin; DST: NAME.bin for llama2.c, NAME.gguf for "
         "llama.cpp, else a Hugging Face folder)")
FORMATS = ("hf", "llama2c", "gguf")


def parse(argv: list[str]) -> tuple[str, str, str, str | None, bool]:
    """SRC, DST, the target format, the GGUF dtype as given (None: the default) and whether
    --merge-lora was given, from `SRC DST [--to FMT] [--dtype D] [--merge-lora]` in any order."""
    options, paths, merge_lora = {"--to": None, "--dtype": None}, [], False
    args = iter(argv)
    for arg in args:
        key, has_value, value = arg.partition("=")
        if arg == "--merge-lora":
            merge_lora = True
        elif key in options:
            options[key] = value if has_value else next(args, None)
            if options[key] is None:
                raise ConfigError(f"{key} needs a value; {USAGE}")
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}; {USAGE}")
        else:
            paths.append(arg)
    if len(paths) != 2:
        raise ConfigError(USAGE)
    source, target = paths
    to = options["--to"] or ("llama2c" if target.endswith(".bin") else "gguf" if target.endswith(".gguf") else "hf")
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not a format; choose one of {', '.join(FORMATS)}")
    if options["--dtype"] is not None and to != "gguf":
        raise ConfigError(f"--dtype only applies to --to gguf (this writes {to})")
    return source, target, to, options["--dtype"], merge_lora


@script
def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    source, target, to, dtype, merge_lora = parse(argv)
    if to == "gguf":
        try:
            import llamacpp  # needs the optional gguf package
        except ModuleNotFoundError as e:
            raise ConfigError(f"writing GGUF needs the {e.name} package: pip install -r requirements-gguf.txt") from None
        dtype = dtype or "f32"
        if dtype not in llamacpp.DTYPES:  # refused before the model is loaded
            raise ConfigError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(llamacpp.DTYPES)}")
    if merge_lora and not (Path(source).is_dir() and (checkpoint.resolve(source) / checkpoint.ADAPTER_CONFIG).is_file()):
        raise ConfigError(f"--merge-lora: {source} holds no LoRA adapters ({checkpoint.ADAPTER_CONFIG}); give the "
                          f"run or checkpoint folder of a --train.lora_rank run")
    if to == "hf" and Path(target).exists() and (Path(target).is_file() or any(Path(target).iterdir())):
        raise ConfigError(f"{target} already exists: give a new folder to write the model into (convert.py never "
                          f"writes over one)")
    model, folder = checkpoint.load_model(source)
    if to == "gguf":
        llamacpp.write_gguf(model, folder, target, dtype)
    else:
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        with disk_write(Path(target).absolute().parent, weights, f"writing {target}",
                        f"{source} is untouched: free disk space (or make the folder writable) and convert again"):
            if to == "llama2c":
                checkpoint.write_llama2c(model, target)
            elif not checkpoint.save_model_folder(model, folder, target):
                print(f"note: {source} has no tokenizer, so {target} holds the weights alone: give prompts as token "
                      f"ids (--prompt_ids), or copy a tokenizer.json in", file=sys.stderr)
    print(f"wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
