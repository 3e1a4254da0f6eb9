"""main(): the settings from the command line, the mode they ask for, and the exit codes
(0, 1 an arm diverged, 2 an error the user can fix, 130 interrupted)."""

import io
import os
import shlex
import sys

import torch

from .evidence import write_summary
from .files import UserError, one_line, os_error
from .launch import NothingToResume, earlier_work, run_training
from .ranks import StoppedOnRank0
from .replay import replay
from .settings import Settings


def main(argv=None, prog="phase_controller.py"):
    """The command line: prog is how the user started it (the script, or the installed command)."""
    if argv is None:
        argv = sys.argv[1:]
        sys.stdout = Console(sys.stdout)  # progress lines appear at once; a reader that goes away stops nothing
    settings = None
    try:
        settings = Settings.from_command_line(argv, prog)
        if settings.summarize is not None:
            write_summary(settings.summarize)
            return 0
        if settings.replay is not None:
            return replay(settings)
        return run_training(settings)
    except StoppedOnRank0:  # rank 0 says why
        return 2
    except UserError as e:
        return error(e, prog)
    except NothingToResume:
        print("\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted; {what_to_do_next(settings, argv, prog)}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or is_allocation_failure(e)):
            raise  # a bug: its traceback is what finds it
        return error(
            f"out of memory ({one_line(e)}); {what_to_do_next(settings, argv, prog, out_of_memory=True)}", prog
        )
    except OSError as e:
        if e.filename is None:
            raise
        return error(f"cannot use {os_error(e)}", prog)


class Console(io.TextIOBase):
    """stdout for a run that may outlive its reader: each line written at once, a name that is not
    UTF-8 escaped, and once the reader is gone (`| head`, a closed terminal) or was never there
    (`>&-`), output goes nowhere and the run goes on to write its files."""

    def __init__(self, stream):
        self.stream = stream
        if stream is None:
            self.lose()
        elif hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True, errors="backslashreplace")

    def write(self, text):
        try:
            self.stream.write(text)
        except (OSError, ValueError):  # BrokenPipeError, or a stream already closed
            self.lose()
        return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except (OSError, ValueError):
            self.lose()

    def isatty(self):
        return self.stream.isatty()

    def lose(self):
        """From now on into the void; fd 1 too, so that Python's own flush at exit finds no broken pipe."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 1)
        except OSError:
            pass
        self.stream = open(devnull, "w")  # noqa: SIM115  (lives as long as the process)


def error(message, prog):
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def what_to_do_next(settings, argv, prog, out_of_memory=False):
    """After an interrupt or running out of memory: what is safe, and the command to continue."""
    if settings is None or settings.summarize is not None or settings.replay is not None:
        smaller = "a smaller input, or " if out_of_memory else ""
        return f"files are written whole or not at all: rerun the same command ({smaller}on a larger machine)"
    smaller = "lower --batch-size or --width (a new run) or free memory; " if out_of_memory else ""
    if not has_work(settings):
        return f"{smaller}no epoch was completed, so there is nothing to resume: rerun the same command"
    command = ["python", prog] if prog.endswith(".py") else [prog]
    again = " ".join(shlex.quote(a) for a in [*command, *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"{smaller}every completed epoch is checkpointed. Continue with:\n  {again}"


def has_work(settings):
    """Whether the output folder holds a checkpoint, epoch log or results file of a seed of this run
    (or cannot tell)."""
    try:
        return bool(earlier_work(settings.output_dir, settings.seeds_to_run()))
    except OSError:
        return True  # cannot tell: advise --resume, which loses nothing


def is_allocation_failure(e):
    """torch's out-of-memory errors: a CUDA one of its own type, a CPU one a RuntimeError saying so."""
    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(e, cuda_oom) or "can't allocate memory" in str(e) or "not enough memory" in str(e)
