"""One-line errors; files read only when regular, written whole and never through a link; locks."""

import errno
import json
import math
import os
import signal
import socket
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # locks; absent on Windows
except ImportError:
    fcntl = None


# Advice for a file that is not what a run writes: never "delete it", which might lose good work.
RESTART = "--restart starts the seed afresh, replacing its checkpoints"


class UserError(Exception):
    """A problem the user can fix (arguments, data, files): reported in one line, exit 2."""


def check_output_dir(path):
    """Refuse an --output-dir that cannot be created or written, creating nothing yet."""
    path = Path(path)
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        writable = existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    except OSError as e:  # a name too long for the file system, say
        raise UserError(f"--output-dir {path} cannot be used ({e.strerror or e})") from None
    if not writable:
        raise UserError(f"--output-dir {path} cannot be created or written ({existing} is not a writable folder)")
    return path


# ----- reading: regular files only -----

# Opening a FIFO for reading waits for a writer; O_NONBLOCK makes it return at once, and for a
# regular file it changes nothing.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def open_regular_file(path):
    """path opened for binary reading, or OSError: a folder, FIFO or device is refused at once."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_BINARY", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a folder, FIFO or device)", str(path))
    return os.fdopen(fd, "rb")


def read_text(path):
    """A regular file's UTF-8 text (a leading byte-order mark dropped); OSError, or ValueError if not UTF-8."""
    with open_regular_file(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text (a binary file, or UTF-16: save it as UTF-8)") from None


def parse_json(text):
    """json.loads, with every way a hostile text can fail it as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("not JSON this program reads: nested too deeply") from None


def is_finite_number(value):
    """An int or float (not JSON's true and false) that is finite as a float."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return False


def os_error(error):
    """An OSError as the file it concerns and the reason."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename else reason


def one_line(error, limit=300):
    """An exception as one line: its type and its message with the line breaks folded, shortened."""
    message = " ".join(str(error).split())
    message = message if len(message) <= limit else message[: limit - 3] + "..."
    return f"{type(error).__name__}: {message}"


# ----- writing: whole files, never through a link -----


def write_atomically(path, data):
    """The bytes data into a new temporary file beside path, then renamed over path, so no reader
    ever sees a half-written file. The temporary file is created exclusively under an unpredictable
    name, and a link at path is refused: nothing is ever written through a link planted there.
    Callers serialize first (JSON, a figure, torch.save into memory), so every fault here is the
    file system's own OSError, never one a serializer wraps."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link: refusing to write through it; remove it and rerun")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    except OSError as e:
        raise UserError(cannot_write(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes it private; the file gets the mode open() would give
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, a folder made read-only: the file there is unchanged
        remove_quietly(tmp)
        raise UserError(cannot_write(path, e)) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_quietly(path):
    """Remove a file of our own if it is there; a folder that refuses keeps it, and the error that
    led here stays the one reported."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def append_to_file(path, data, keep):
    """The file at path cut to its first `keep` bytes (what a kill left after them goes), then data
    appended and flushed to the disk; returns its new size. Never follows a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as e:
        raise UserError(cannot_write(path, e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{path} is not a regular file: refusing to write to it; remove it and rerun")
            f.truncate(keep)
            f.seek(keep)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(cannot_write(path, e)) from None
    return keep + len(data)


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM held until the block ends, then delivered: for work a signal must not cut
    in two (torch.save would report the interrupt as an error of its own).

    The block notes them in handlers of its own, not by blocking them in this thread: the kernel
    hands a signal to any thread that does not block it (torch's worker threads, say), and Python
    then acts on it in the main thread all the same. Python handlers run in the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, handler in previous.items():
        if handler is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(number, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:
                signal.signal(number, handler)
        for number in dict.fromkeys(caught):  # each signal once, in the order they came
            signal.raise_signal(number)


def cannot_write(path, error):
    return (
        f"cannot write {path} ({error.strerror or error}); what was there is unchanged: free space or fix "
        "permissions, then rerun (with --resume, a training run continues from its last checkpoint)"
    )


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path, obj, indent=2):
    """obj as JSON; indent=None writes it compactly, with json's fast encoder (the indenting one is pure Python)."""
    text = json.dumps(obj, indent=indent, allow_nan=False) + "\n"
    write_atomically(path, text.encode())


class LockHeld(Exception):
    """Another process holds the lock; holder names it."""

    def __init__(self, holder):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def lock_file(path, wait_message=None):
    """Hold the kernel's lock (flock) on the file path for the block; yields whether locks exist here.

    A killed process never leaves a lock behind: the kernel drops it. The file only names the
    holder and is removed when the block ends. When another process holds it: LockHeld, or with a
    wait_message, that message (with {holder}) printed and the lock awaited. The file is opened
    without following a link, so a link planted at path is refused, never written through.
    """
    if fcntl is None:  # no flock on this platform (Windows)
        yield False
        return
    path = Path(path)
    while True:
        handle = open_lock(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if wait_message is None:
                handle.close()
                raise LockHeld(holder) from None
            print(wait_message.format(holder=holder))
            fcntl.flock(handle, fcntl.LOCK_EX)
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # its holder finished and removed the file while we waited for it: take the new one
    try:
        handle.seek(0)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield True
    finally:
        remove_quietly(path)  # while still held, so no one locks a removed file; never masks the real error
        handle.close()


def open_lock(path):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _NONBLOCK, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link: refusing to use it as a lock; remove it and rerun") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file: refusing to use it as a lock; remove it and rerun")
    return os.fdopen(fd, "r+")


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
