"""One-line errors, files written whole or not at all, and what identifies a run in its results file."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

# The arms of a seed, as the results files name them, and the accuracies compared between them.
ARMS = (BASELINE, PHASE_AWARE, CONTROL) = ("baseline", "phase_aware", "control")
METRICS = ("best_acc", "final_acc")

# The settings that define what a seed's run computes: runs that agree on these and the seed
# compute the same numbers (on the same machine), so these are what --resume and --summarize compare.
RUN_KEYS = (
    "dataset", "subset", "val_size", "epochs", "warmup_epochs", "base_lr", "batch_size",
    "width", "momentum", "weight_decay", "precision", "control", "s1_threshold",
    "s2_threshold", "lr_pulse", "grad_accum", "s3_patience", "dl_window", "dl_mode",
)  # fmt: skip
# Settings added after results files were first published, and what the runs before them used.
RUN_KEY_DEFAULTS = {"dl_mode": "absolute"}


class UserError(Exception):
    """A problem the user can fix (arguments, data, files): reported in one line, exit 2."""


def run_identity(config):
    """The RUN_KEYS of a results file's config, with the defaults of settings it predates."""
    return {k: config[k] if k in config else RUN_KEY_DEFAULTS[k] for k in RUN_KEYS}


def check_output_dir(path):
    """Refuse an --output-dir that cannot be created or written, creating nothing yet."""
    path = Path(path)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {path} cannot be created or written ({existing} is not a writable folder)")
    return path


def write_atomically(path, write):
    """write(tmp_path) then rename over path, so no reader ever sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")

    write_atomically(path, write)


def make_folder(path, flag):
    """mkdir -p path, or one line naming the flag that asked for it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be created ({e.strerror or e})") from None
    return path


@contextmanager
def new_folders_removed_on_failure(path, flag):
    """mkdir -p path; if the block then fails, remove again the (empty) folders this made, so a
    start that fails leaves nothing behind."""
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()]  # deepest first
    make_folder(path, flag)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
