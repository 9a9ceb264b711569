"""Convert a model between our checkpoints, Hugging Face Llama folders and llama2.c's .bin files.

    python convert.py out/run/ model.bin          # newest checkpoint of a run -> llama2.c (run.c runs it)
    python convert.py stories260K.bin hf-folder/  # llama2.c -> a Hugging Face / nanollama folder

The formats themselves live in checkpoint.py.
"""

from __future__ import annotations

import sys

import checkpoint
from config import ConfigError, script

USAGE = ("usage: python convert.py SRC DST (SRC: a checkpoint, run or Hugging Face folder or a llama2.c .bin; "
         "DST: NAME.bin for llama2.c, else a Hugging Face folder)")


@script
def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\n" + USAGE)
        return
    if len(argv) != 2 or argv[0].startswith("-"):
        raise ConfigError(USAGE)
    source, target = argv
    model, _ = checkpoint.load_model(source)
    if target.endswith(".bin"):
        checkpoint.write_llama2c(model, target)
    else:
        checkpoint.save_hf(model, target)
    print(f"wrote {target}")


if __name__ == "__main__":
    sys.exit(main())
