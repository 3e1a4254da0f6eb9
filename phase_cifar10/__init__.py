"""The CIFAR-10 experiment around phase_controller.py, one file per stage, in the order data flows:

    model.py         hyperparameters, the shared base schedule, the narrow CIFAR ResNet
    files.py         one-line errors, files read and written safely, locks
    settings.py      a run's settings, each defined once; the flags built from them; their one check
    data.py          CIFAR-10 read safely, downloaded and checked; the synthetic task; the splits
    loader.py        whole splits on the training device, augmented a whole epoch at a time
    records.py       results files and checkpoints: their names, and their shape checked before use
    progress.py      the console's progress lines
    training.py      one training loop for every arm: a seed's arms, an arm as one object, the control
    figures.py       per-seed, summary and replay figures
    evidence.py      paired statistics, the multi-seed summary, the success criteria
    replay.py        the controller over a logged loss curve
    launch.py        devices, precision, torchrun ranks, locks, resume: each seed from start to results file
    command_line.py  main(): the mode the settings ask for, and the exit codes

The mechanism itself is phase_controller.py, which needs torch only; this package adds numpy and
matplotlib (`pip install ".[demo]"`).
"""

import os
import signal
import sys

__version__ = "0.4.0"  # the package's version, which pyproject.toml reads from here


def main(argv=None, prog="phase-controller"):
    """The `phase-controller` command and `python phase_controller.py`; returns the exit code."""
    # A cluster's preemption (SIGTERM) stops a run as cleanly as Ctrl-C does, from the first moment.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    if hasattr(sys.stderr, "reconfigure"):  # a file name that is not UTF-8 stays printable
        sys.stderr.reconfigure(errors="backslashreplace")
    os.environ["MPLBACKEND"] = "Agg"  # the experiment draws into files: no display, whatever the shell says
    try:
        try:
            import matplotlib  # noqa: F401
            import numpy  # noqa: F401
        except ImportError as e:
            print(f"{prog}: error: the experiment needs numpy and matplotlib ({e}): pip install numpy matplotlib",
                  file=sys.stderr)  # fmt: skip
            return 2
        try:
            from .command_line import main as run_command_line  # torch: seconds
        except KeyboardInterrupt:
            print("\ninterrupted while starting; nothing was written", file=sys.stderr)
            return 130
        return run_command_line(argv, prog)
    finally:
        signal.signal(signal.SIGTERM, previous)
