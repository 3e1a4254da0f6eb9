"""The device a process trains on: which one, the precision it computes in, the deterministic
backends every run sets up, and whether a model fits."""

import os
import platform
from contextlib import nullcontext
from pathlib import Path

import torch

from .files import UserError
from .model import parameter_count


def pick_device(name, local_rank=0, local_world=1):
    """The device of this process; under torchrun, cuda:LOCAL_RANK.

    Every rank checks the node's process count against its GPUs before the ranks meet, so a bad
    launch stops all ranks with the same line instead of leaving rank 0 waiting for the others.
    """
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda":
        if not cuda:
            raise UserError(f"--device cuda asked for, but torch {torch.__version__} sees no CUDA device")
        count, processes = torch.cuda.device_count(), max(local_world, local_rank + 1)
        if processes > count:
            raise UserError(
                f"{processes} processes on this node need one CUDA device each, but {count}"
                f" are visible: start at most {count} per node (torchrun --nproc_per_node {count})"
            )
        torch.cuda.set_device(local_rank)  # NCCL and the default CUDA stream follow the current device
        return torch.device("cuda", local_rank)
    if name == "mps" and not mps:
        raise UserError("--device mps asked for, but this torch sees no MPS device")
    return torch.device(name)


def native_bf16(device):
    """Whether the hardware computes bf16 natively; emulated bf16 is slower than fp32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # a torch without the argument: it reports native support only
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def machine_name(device):
    """The hardware whose arithmetic a run's numbers come from, as its results file names it: the
    GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        cpu = None
    cpu = cpu or platform.processor() or platform.machine()
    return cpu if device.type == "cpu" else f"{device.type} on {cpu}"


def cpu_model(cpuinfo):
    """The first CPU's model name in a Linux /proc/cpuinfo, with its family and model numbers:
    virtual machines often give only a brand ("AMD EPYC"), and CPU generations differ in their
    bf16 arithmetic. None if it names no model."""
    first = cpuinfo.split("\n\n", 1)[0]
    fields = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first.splitlines())}
    numbers = [f"{key} {fields[key]}" for key in ("cpu family", "model") if fields.get(key)]
    name = fields.get("model name") or None
    return f"{name} ({', '.join(numbers)})" if name and numbers else name


def choose_precision(bf16, device):
    """What --bf16 auto|on|off means on this device: bf16 autocast, or fp32."""
    if bf16 == "on" and device.type == "mps":
        raise UserError("--bf16 on is not supported on MPS here")
    return "bf16-autocast" if bf16 == "on" or (bf16 == "auto" and native_bf16(device)) else "fp32"


def autocast_for(device, precision):
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_up_backends():
    """Deterministic kernels, and fp32 that is IEEE fp32 on every device.

    cuDNN convolutions use TF32 by default, so without this `--bf16 off` on a GPU would train in
    TF32 while recording fp32. The allow_tf32 flags exist in every torch from 2.4 on; torch 2.9's
    fp32_precision API is not touched, since mixing the two makes reading allow_tf32 raise.
    """
    # cuBLAS is deterministic only with this workspace setting, set before CUDA starts (lazily, at
    # the first CUDA tensor). Set by the command line, not on import: a library leaves its user's
    # environment alone.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def check_model_fits(width, device):
    """Refuse a --width whose weights, gradients and momentum alone (4 bytes each) exceed the device's memory."""
    parameters, memory = parameter_count(width), device_memory(device)
    if memory is not None and 12 * parameters > memory:
        raise UserError(
            f"--width {width}: the model's {parameters:,} parameters need {12 * parameters // 2**30:,} GiB for "
            f"weights, gradients and momentum alone, more than the {memory // 2**30:,} GiB of {device}"
        )


def device_memory(device):
    """Bytes of memory of the device, where torch or the OS tell."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if device.type == "cpu" else None
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or not these names
        return None
