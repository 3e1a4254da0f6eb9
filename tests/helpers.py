"""Test helpers: small CIFAR-format folders and command-line runs."""

import contextlib
import copy
import io
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from phase_cifar10 import command_line, data, records, training

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time_seconds", "train_seconds", "eval_seconds"}

# A run small enough for CPU tests: synthetic data, width 4, four steps per epoch, on the CPU in
# fp32 whatever the machine offers (bf16 has tests of its own).
TINY = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "64", "--epochs", "5",
        "--device", "cpu", "--bf16", "off"]  # fmt: skip
# Three tiny epochs: what the fault and hostile-input tests start from.
RUN = [*TINY, "--epochs", "3"]
# Thresholds that walk the phase arm through every phase within six tiny epochs: S1 at epoch 2,
# S2 (accumulation 2) at epoch 3, S3 once the eval loss stops improving.
ALL_PHASES = ["--epochs", "6", "--s2-threshold", "1.0", "--s3-patience", "1"]


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now: where hand-started ranks can meet."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- the official pickle layout -----


def py2_str(text):
    """A Python 2 str: loads as str under encoding="latin1", as bytes under "bytes"."""
    raw = text if isinstance(text, bytes) else text.encode("latin1")
    if len(raw) < 256:
        return b"U" + bytes([len(raw)]) + raw
    return b"T" + struct.pack("<i", len(raw)) + raw


def py2_int(value):
    return b"J" + struct.pack("<i", value)


def py2_value(value):
    if isinstance(value, np.ndarray):  # as numpy 1 under Python 2 pickled a 2-D uint8 array
        dtype = b"cnumpy\ndtype\n" + py2_str("u1") + py2_int(0) + py2_int(1) + b"\x87R"
        dtype += b"(" + py2_int(3) + py2_str("|") + b"NNN" + py2_int(-1) + py2_int(-1) + py2_int(0) + b"tb"
        head = (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + py2_int(0) + b"\x85" + py2_str("b") + b"\x87R"
        )
        shape = b"(" + b"".join(py2_int(n) for n in value.shape) + b"t"
        return head + b"(" + py2_int(1) + shape + dtype + b"\x89" + py2_str(value.tobytes()) + b"tb"
    if isinstance(value, list):
        return b"](" + b"".join(py2_value(v) for v in value) + b"e"
    if isinstance(value, int):
        return py2_int(value)
    return py2_str(value)


def official_pickle(obj):
    """Protocol-2 bytes laid out as Python 2's cPickle wrote the official CIFAR-10 files."""
    return b"\x80\x02}(" + b"".join(py2_str(k) + py2_value(v) for k, v in obj.items()) + b"u."


def write_batch(path, obj, layout):
    if layout == "official":
        path.write_bytes(official_pickle(obj))
    elif layout == "bytes-keys":  # a Python 3 copy with bytes keys
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in obj.items()}, protocol=3))
    else:  # "str-keys": a Python 3 copy with str keys
        path.write_bytes(pickle.dumps(obj, protocol=4))


def write_cifar_folder(root, per_batch=20, layout="official", seed=0):
    """A small cifar-10-batches-py folder under root; returns (train_x, train_y, test_x, test_y)."""
    folder = Path(root) / data.CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for name in (*data.CIFAR_TRAIN_FILES, "test_batch"):
        images = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        write_batch(folder / name, {"batch_label": name, "labels": labels, "data": images}, layout)
        arrays[name] = (images, labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    write_batch(folder / "batches.meta", meta, layout)
    train_x = np.concatenate([arrays[n][0] for n in data.CIFAR_TRAIN_FILES]).reshape(-1, 3, 32, 32)
    train_y = np.concatenate([arrays[n][1] for n in data.CIFAR_TRAIN_FILES])
    test_x, test_y = arrays["test_batch"]
    return train_x, train_y, test_x.reshape(-1, 3, 32, 32), np.asarray(test_y)


# ----- runs -----


def cli(*args, env=None):
    """phase_controller.py in a fresh Python process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "phase_controller.py"), *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=ROOT,
    )  # fmt: skip


def documented_code(path, after):
    """The first ```python block after the text `after` in a document of the repository."""
    text = (ROOT / path).read_text().split(after, 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def run_documented_code(path, after):
    """That block executed as written: the names it defines."""
    namespace = {}
    exec(compile(documented_code(path, after), path, "exec"), namespace)
    return namespace


def read_json(path):
    return json.loads(Path(path).read_text())


def without_timings(obj):
    """A results structure without timings and output folder, for value-for-value comparison of runs
    with the same arguments that the tests had to write to different folders."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS | {"output_dir"}}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def results_files(folder):
    """{name: contents without timings} of every JSON file in folder: results files and summary."""
    return {path.name: without_timings(read_json(path)) for path in sorted(Path(folder).glob("*.json"))}


def leftover_temp_files(folder):
    return sorted(p.name for p in Path(folder).rglob(".*.tmp-*"))


def run_main(argv):
    """phase_controller.main in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = command_line.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# ----- checkpoints, edited as a hostile user would -----


def read_checkpoint(path):
    """A checkpoint's state, its arm's per-epoch log read back from the epoch log beside it."""
    return records.load_checkpoint(path)


def write_checkpoint(path, state):
    """A checkpoint as a run leaves one, written here without the code under test: the state with its
    per-epoch lists emptied, and beside it their rows, one JSON object per epoch, a row holding the
    values each list has for it."""
    state = copy.deepcopy(state)
    log = state["arm"].get("per_epoch") if isinstance(state.get("arm"), dict) else None
    rows = ""
    if isinstance(log, dict):
        columns = {key: values for key, values in log.items() if isinstance(values, list)}
        for i in range(max(map(len, columns.values()), default=0)):
            rows += json.dumps({key: values[i] for key, values in columns.items() if i < len(values)}) + "\n"
        state["arm"]["per_epoch"] = {key: [] for key in log}
        state["logged"], state["log_bytes"] = rows.count("\n"), len(rows.encode())
    Path(path).with_suffix(".jsonl").write_text(rows)
    torch.save(state, path)


def table_lines(text):
    """The lines of the Markdown tables in text."""
    return [line for line in text.splitlines() if line.startswith("|")]


def row_cells(line):
    """The cells of a Markdown table's row, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def one_line_error(code, stderr, *fragments):
    assert code == 2 and stderr.startswith("phase_controller.py: error: ") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def edit(obj, path, value):
    *parents, last = path
    for key in parents:
        obj = obj[key]
    if value is DELETE:
        del obj[last]
    else:
        obj[last] = value


DELETE = object()


def files_left(folder):
    return sorted(p.name for p in folder.iterdir())


def interrupt_after(monkeypatch, epochs):
    """Raise KeyboardInterrupt, as Ctrl-C would, once `epochs` epochs have been logged."""
    original, logged = training.log_epoch, []

    def log_then_interrupt(*args):
        original(*args)
        logged.append(1)
        if len(logged) == epochs:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "log_epoch", log_then_interrupt)
