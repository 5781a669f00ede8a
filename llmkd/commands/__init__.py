"""The `llmkd` command: one entry point for every stage of the pipeline and for serving.

    llmkd prepare --config configs/ml100k.yaml
    llmkd finetune --config configs/ml100k.yaml
    llmkd distill --config configs/ml100k.yaml --set distill.alpha=0 --set distill.name=student_no_kd
    llmkd distill --multi_gpu --num_processes 2 -- --config configs/ml100k.yaml   # launch options, then --
    llmkd export --config configs/ml100k.yaml --student student_kd --output bundles/ml100k
    llmkd recommend bundles/ml100k --history 50,172,133 --k 10
    llmkd verify bundles/ml100k
    llmkd serve bundles/ml100k --host 127.0.0.1 --port 8000

Each subcommand is a row of `STAGES`: the script under `scripts/` it runs, so `llmkd X ...` and
`python scripts/x.py ...` are one code path with one set of options (`--config`, `--set`, `--student`,
`--output`, `--wait-lock` wherever they apply). `distill` and `finetune` (and `teacher`, when given launch
options: `llmkd teacher --multi_gpu --num_processes 2 -- --config ...`) run their script through
Accelerate's launcher (`accelerate.commands.launch`, the code behind `accelerate launch`), so they scale
out the same way and read the same `accelerate config`. Arguments before a `--` go to the launcher, the
rest to the script (without `--`, all go to the script). What `accelerate launch` does not do: a user
error in the script ends the command with the script's one `error:` line and exit status 2, where
`accelerate launch` adds its own traceback and exits 1. The other stages run their script in this
process, named `llmkd X` in its usage line: one interpreter start, and signals (Ctrl-C, a
SIGTERM to `llmkd serve`) reach the stage itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from llmkd.commands.cli import ERROR_FILE_ENV
from llmkd.infra.artifacts import LlmkdError

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@dataclass(frozen=True)
class Stage:
    """A subcommand: the script under `scripts/` it runs, and whether Accelerate launches it."""

    script: str
    help: str
    launched: bool = True
    launchable: bool = False
    """Not launched by default, but through Accelerate when launch options come before a `--`."""


STAGES = {
    "prepare": Stage("prepare_data.py", "split interactions + item text into <out_dir>/data", launched=False),
    "finetune": Stage("finetune_teacher.py", "LoRA-tune the teacher (a PEFT adapter under out_dir)"),
    "teacher": Stage("build_teacher.py", "cache the teacher's item and user vectors", launched=False, launchable=True),
    "distill": Stage("distill.py", "train the two-tower student, with or without the teacher"),
    "tune": Stage("tune.py", "search the distillation recipe on valid within a budget", launched=False),
    "index": Stage("build_index.py", "FAISS index over a student's item vectors", launched=False),
    "evaluate": Stage("evaluate.py", "popularity, teacher and students on test -> <out_dir>/eval", launched=False),
    "export": Stage("export.py", "a self-contained serving bundle from a student", launched=False),
    "export-onnx": Stage("export_onnx.py", "the bundle's user tower as an ONNX graph, checked against torch",
                         launched=False),
    "recommend": Stage("recommend.py", "top-k items for one history from a bundle, as JSON", launched=False),
    "add-items": Stage("add_items.py", "new items into a bundle from their text, no retraining", launched=False),
    "verify": Stage("verify.py", "check a bundle's files against its manifest (sizes, SHA-256); print its version",
                    launched=False),
    "serve": Stage("serve.py", "HTTP service over a bundle (FastAPI on uvicorn)", launched=False),
    "load-test": Stage("load_test.py", "N concurrent clients against `llmkd serve` on loopback", launched=False),
    "benchmark-serving": Stage("benchmark_serving.py", "bundle API, HTTP and teachers side by side: latency, "
                               "throughput, memory", launched=False),
    "cold-start": Stage("cold_start.py", "Recall@K on items withheld from training", launched=False),
    "seeds": Stage("seeds.py", "no-KD vs KD students over several seeds", launched=False),
    "benchmark-kd": Stage("benchmark_kd.py", "every KD variant, chosen on valid, over seeds", launched=False),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<13} {stage.help} (scripts/{stage.script})" for name, stage in STAGES.items())
    launched = " and ".join(f"`{name}`" for name, stage in STAGES.items() if stage.launched or stage.launchable)
    return (f"usage: llmkd COMMAND [ARGUMENTS]\n       llmkd {{distill,finetune,teacher}} [LAUNCH OPTIONS --] [ARGUMENTS]\n\n"
            f"commands:\n{rows}\n\nARGUMENTS are the script's (see `llmkd COMMAND --help`); for {launched}, LAUNCH "
            "OPTIONS\nbefore a `--` go to `accelerate launch` (e.g. --multi_gpu --num_processes 2); `teacher` runs in "
            "this\nprocess unless given launch options.")


def split_arguments(args: list[str]) -> tuple[list[str], list[str]]:
    """(launch options, script arguments): split at the first `--`, else everything is the script's."""
    if "--" in args:
        i = args.index("--")
        return args[:i], args[i + 1 :]
    return [], args


def failure_status(exitcodes: list[int]) -> int:
    """The exit status of a failed multi-process run, from its ranks' exit codes in rank order: the
    first that exited by itself (a user error's 2), not one the launcher then killed (a negative code,
    -15 for SIGTERM, or 241 = -15 & 0xff where torch's SIGTERM handler exits with -15); only signals:
    128 + the first one, as a shell says."""
    own = next((c for c in exitcodes if 0 < c < 128), None)
    if own is not None:
        return own
    killed = next((c for c in exitcodes if c != 0), None)
    return 1 if killed is None else 128 - killed if killed < 0 else killed


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
        os.environ[ERROR_FILE_ENV] = str(errors)  # the launched processes inherit it (`llmkd.commands.cli.run`)
        try:
            launch_command(args)
            status = 0
        except subprocess.CalledProcessError as e:  # one process
            status = e.returncode
        except ChildFailedError as e:  # several processes: the first rank that failed by itself
            status = failure_status([f.exitcode for _, f in sorted(e.failures.items())])
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
    if stage.launched or (stage.launchable and launch_args):
        return launch(script, launch_args, script_args)
    if launch_args:
        raise LlmkdError(f"llmkd {name}: takes no launch options (nothing before `--`)")
    return run_in_process(script, f"llmkd {name}", script_args)


def run_in_process(script: Path, prog: str, script_args: list[str]) -> int:
    """Run `script` as `__main__` in this interpreter with argv `[prog, *script_args]` (argparse names it
    `prog`; `runpy.run_path` would put the script's path there); return its exit status (0 when it
    returns, else its SystemExit's). The script is `sys.modules['__main__']` meanwhile, as when run
    directly, so spawned worker processes (`llmkd tune --jobs 2`) find it."""
    import types

    module = types.ModuleType("__main__")
    module.__file__ = str(script)
    code = compile(script.read_bytes(), str(script), "exec")
    saved = sys.argv, sys.modules["__main__"]
    sys.argv, sys.modules["__main__"] = [prog, *script_args], module
    try:
        exec(code, module.__dict__)  # noqa: S102 -- our own script, as `python script` would run it
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)  # sys.exit("message"), as the interpreter would print it
        return 1
    finally:
        sys.argv, sys.modules["__main__"] = saved
    return 0


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
