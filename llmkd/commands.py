"""The `llmkd` command: one entry point for the pipeline's stages.

    llmkd distill --config configs/ml100k.yaml --set distill.alpha=0 --set distill.name=student_no_kd
    llmkd finetune --config configs/ml100k.yaml
    llmkd distill --multi_gpu --num_processes 2 -- --config configs/ml100k.yaml   # launch options, then --

`distill` and `finetune` run `scripts/distill.py` / `scripts/finetune_teacher.py` through Accelerate's
launcher (`accelerate.commands.launch`, the code behind `accelerate launch`), so they scale out the same way
and read the same `accelerate config`. Arguments before a `--` go to the launcher, the rest to the script
(without `--`, all go to the script). What `accelerate launch` does not do: a user error in the script
ends the command with the script's one `error:` line and exit status 2, where `accelerate launch` adds
its own traceback and exits 1. A stage is a row of `STAGES`; stages that need no launcher can join with
`launched=False`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmkd.artifacts import LlmkdError
from llmkd.cli import ERROR_FILE_ENV

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@dataclass(frozen=True)
class Stage:
    """A subcommand: the script under `scripts/` it runs, and whether Accelerate launches it."""

    script: str
    help: str
    launched: bool = True


STAGES = {
    "finetune": Stage("finetune_teacher.py", "LoRA-tune the teacher (a PEFT adapter under out_dir)"),
    "distill": Stage("distill.py", "train the two-tower student, with or without the teacher"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {stage.help} (scripts/{stage.script})" for name, stage in STAGES.items())
    return (f"usage: llmkd COMMAND [LAUNCH OPTIONS --] [ARGUMENTS]\n\ncommands:\n{rows}\n\n"
            "ARGUMENTS go to the script (see `llmkd COMMAND --help`); LAUNCH OPTIONS, before a `--`, go to\n"
            "`accelerate launch` (e.g. --multi_gpu --num_processes 2).")


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """(launch options, script arguments): split at the first `--`, else everything is the script's."""
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return [], args


def launch(script: Path, launch_args: list[str], script_args: list[str]) -> int:
    """Run `accelerate launch [launch_args] script [script_args]` in-process; return the script's exit
    status (Accelerate raises it as an exception with a traceback, torch.distributed logs it too)."""
    import logging

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([*launch_args, str(script), *script_args])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the error lines say it
    with tempfile.TemporaryDirectory(prefix="llmkd-") as tmp:
        errors = Path(tmp) / "errors.txt"
        os.environ[ERROR_FILE_ENV] = str(errors)  # the launched processes inherit it (`llmkd.cli.run`)
        try:
            launch_command(args)
            status = 0
        except subprocess.CalledProcessError as e:  # one process
            status = e.returncode
        except ChildFailedError as e:  # several processes: the first failure's status
            status = min(e.failures.items())[1].exitcode
        finally:
            del os.environ[ERROR_FILE_ENV]
        lines = errors.read_text(encoding="utf-8").splitlines() if errors.is_file() else []
    for line in dict.fromkeys(lines):  # each distinct line once, in order
        print(line, file=sys.stderr)
    return status


def run_stage(name: str, args: list[str]) -> int:
    stage = STAGES[name]
    script = SCRIPTS / stage.script
    if not script.is_file():
        raise LlmkdError(f"{script}: not found; `llmkd {name}` runs the scripts of a source checkout "
                         "(pip install -e .)")
    launch_args, script_args = split_arguments(args)
    if stage.launched:
        return launch(script, launch_args, script_args)
    if launch_args:
        raise LlmkdError(f"llmkd {name}: takes no launch options (nothing before `--`)")
    return subprocess.call([sys.executable, str(script), *script_args])


def main(argv: list[str] | None = None) -> None:
    """`llmkd COMMAND ...`: exit with the stage's status; a usage error is one line and status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    try:
        if name not in STAGES:
            raise LlmkdError(f"unknown command {name!r}; expected one of: {', '.join(STAGES)} (llmkd --help)")
        sys.exit(run_stage(name, rest))
    except LlmkdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
