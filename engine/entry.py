"""The `vipo` command's entry point. `pip install vipo` installs the loss kernels alone (torch and
Triton); the engine, loaders and evaluation need `vipo[train]`. Without them the command says so
in one line instead of a traceback from an import."""

import sys

# Top-level modules of the `train` extra (setup.py) and of the optional extras a command uses.
EXTRA_OF = {
    **dict.fromkeys(
        (
            "yaml",
            "safetensors",
            "tqdm",
            "PIL",
            "matplotlib",
            "pyarrow",
            "diffusers",
            "transformers",
            "peft",
            "accelerate",
            "sentencepiece",
        ),
        "train",
    ),
    "av": "video",
    "deepspeed": "deepspeed",
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The one line for a module of an extra that is not installed; None for any other module."""
    root = (err.name or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    if extra is None:
        return None
    return (
        f"vipo: this command needs the '{extra}' extra ({root} is not installed): pip install 'vipo[{extra}]'"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        from vipo.engine.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as err:
        line = missing_extra(err)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2
