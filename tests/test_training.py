"""The training loop: gradient accumulation, the paired arms end to end, the outputs."""

import copy
import math
import re
import tomllib
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import ROOT, TINY, read_json, run_main

import phase_cifar10
import phase_controller
from phase_cifar10 import data, devices, figures, loader, model, training

# ----- gradient accumulation -----


def toy_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))  # no BatchNorm: batch statistics would differ


def sgd(net):
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_accumulating_two_micro_batches_equals_one_step_on_their_union():
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, 5, (16,))
    split, union = toy_model(), toy_model()
    opt_split, opt_union = sgd(split), sgd(union)
    for _ in range(3):  # several epochs, so momentum buffers are compared too
        loss_split, acc_split, _ = training.train_epoch(
            split, opt_split, [(x[:8], y[:8]), (x[8:], y[8:])], 2, nullcontext()
        )
        loss_union, acc_union, _ = training.train_epoch(union, opt_union, [(x, y)], 1, nullcontext())
        assert loss_split == pytest.approx(loss_union, rel=1e-6) and acc_split == acc_union
    for p, q in zip(split.parameters(), union.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(split[1].weight, toy_model()[1].weight)  # it did train


@pytest.mark.parametrize(
    "sizes, accum, windows",
    [
        ([8, 8, 8], 2, [[0, 1], [2]]),  # the last window is one micro-batch: a normal step on it
        ([5, 3, 4], 2, [[0, 1], [2]]),  # unequal sizes weigh by size
        ([6, 2, 7, 1, 3], 3, [[0, 1, 2], [3, 4]]),  # a short last window of two
    ],
)
def test_every_window_steps_on_the_per_sample_mean_of_its_samples(sizes, accum, windows):
    # The reference: plain SGD steps, one per window, each on the union of its micro-batches.
    x, y = torch.randn(sum(sizes), 3, 2, 2), torch.randint(0, 5, (sum(sizes),))
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    micro = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    unions = [(torch.cat([micro[i][0] for i in w]), torch.cat([micro[i][1] for i in w])) for w in windows]
    split, union = toy_model(), toy_model()
    opt_split, opt_union = sgd(split), sgd(union)
    for _ in range(2):
        training.train_epoch(split, opt_split, micro, accum, nullcontext())
        for images, labels in unions:
            opt_union.zero_grad()
            F.cross_entropy(union(images), labels).backward()
            opt_union.step()
    for p, q in zip(split.parameters(), union.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("micro_batches, accum, steps", [(5, 1, 5), (5, 2, 3), (6, 3, 2), (2, 4, 1)])
def test_optimizer_steps_every_k_micro_batches_and_after_the_last(micro_batches, accum, steps):
    net = toy_model()
    optimizer = sgd(net)
    calls = []
    original_step = optimizer.step
    optimizer.step = lambda: calls.append(1) or original_step()
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 5, (4,))) for _ in range(micro_batches)]
    _, _, counted = training.train_epoch(net, optimizer, batches, accum, nullcontext())
    assert len(calls) == steps and counted == steps  # what it reports is what it took
    assert all(p.grad is None for p in net.parameters())  # nothing left over for the next epoch


def test_reported_loss_is_the_unscaled_per_sample_mean():
    net = toy_model()
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 5, (8,))
    with torch.no_grad():
        expected = F.cross_entropy(net(x), y).item()  # one step at the end: all losses seen at start weights
        expected_acc = 100 * (net(x).argmax(1) == y).float().mean().item()
    loss, acc, _ = training.train_epoch(net, sgd(net), [(x[:3], y[:3]), (x[3:], y[3:])], 4, nullcontext())
    assert loss == pytest.approx(expected, rel=1e-6) and acc == pytest.approx(expected_acc)


def test_evaluate_is_mean_loss_and_accuracy_over_the_split():
    dataset = data.synthetic_dataset(0)
    split = loader.DeviceSplit(dataset.test_x[:300], dataset.test_y[:300], torch.device("cpu"))
    net = model.build_model(8, 0, torch.device("cpu")).eval()
    with torch.no_grad():
        x = torch.cat([x for x, _ in split.eval_batches(1000)])
        logits = net(x)
    loss, acc = training.evaluate(net, split, nullcontext())
    assert loss == pytest.approx(F.cross_entropy(logits, split.labels).item(), rel=1e-5)
    assert acc == pytest.approx(100 * (logits.argmax(1) == split.labels).float().mean().item())


# ----- the paired arms, end to end -----


def test_outputs_and_their_keys(default_run):
    out, results, _ = default_run
    assert sorted(p.name for p in out.iterdir()) == ["figure_seed_42.png", "results_seed_42.json"]  # no lock left
    assert (out / "figure_seed_42.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = results["config"]
    flags = {"seed", "epochs", "device", "multi_seed", "seeds", "s1_threshold", "s2_threshold", "lr_pulse",
             "output_dir", "data_dir", "dataset", "subset", "width", "batch_size", "base_lr", "warmup_epochs",
             "grad_accum", "s3_patience", "dl_window", "bf16", "control", "val_size"}  # fmt: skip
    assert flags | {"torch_version", "model_params", "precision", "memory_format"} <= set(config)
    assert config["dataset"] == "synthetic" and config["precision"] == "fp32" and config["device"] == "cpu"
    assert config["tf32"] is False  # fp32 means IEEE fp32, also where a GPU would offer TF32
    assert config["seeds"] == "42" and not config["multi_seed"]  # the seeds this run trained: its one
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "phase_cifar10.__version__"}
    assert config["version"] == phase_cifar10.__version__
    assert config["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", config["git_commit"])
    assert config["model_params"] == sum(p.numel() for p in model.CifarResNet(config["width"]).parameters())
    assert set(results) == {"config", "baseline", "phase_aware", "delta_best_acc", "delta_final_acc"}
    per_epoch = ["train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "steps", "train_seconds", "eval_seconds"]
    for name in ("baseline", "phase_aware"):
        arm = results[name]
        assert {"best_acc", "final_acc", "time_seconds", "per_epoch", "status"} <= set(arm)
        assert arm["status"] == "ok" and set(per_epoch) <= set(arm["per_epoch"])
        assert all(len(arm["per_epoch"][k]) == 6 for k in per_epoch)
        assert arm["best_acc"] == max(arm["per_epoch"]["eval_acc"])
        assert arm["final_acc"] == arm["per_epoch"]["eval_acc"][-1]
    phase = results["phase_aware"]
    assert all(len(phase["per_epoch"][k]) == 6 for k in ("phase", "dL", "lr_mult", "accumulation"))
    assert {"transitions", "transition_epochs"} <= set(phase)
    # 256 images in batches of 64: 4 steps an epoch at accumulation 1, 2 at accumulation 2.
    assert results["baseline"]["per_epoch"]["steps"] == [4] * 6
    assert phase["per_epoch"]["steps"] == [4, 4, 4, 4, 2, 2] and phase["per_epoch"]["accumulation"][-2:] == [2, 2]
    assert results["delta_best_acc"] == phase["best_acc"] - results["baseline"]["best_acc"]
    assert results["delta_final_acc"] == phase["final_acc"] - results["baseline"]["final_acc"]


def test_phase_arm_walks_the_phases_with_a_one_epoch_delay(default_run):
    _, results, _ = default_run
    log, cfg = results["phase_aware"]["per_epoch"], results["config"]
    assert (
        results["phase_aware"]["transition_epochs"]["S1"] == 2
        and results["phase_aware"]["transition_epochs"]["S2"] == 3
    )
    table = {
        "S0_EXPLORE": (1.0, 1),
        "S1_BOUNDARY": (cfg["lr_pulse"], 1),
        "S2_AXIS_LOCK": (0.5, 2),
        "S3_POLISH": (0.1, 2),
    }
    assert (log["lr_mult"][0], log["accumulation"][0]) == (1.0, 1)
    for epoch in range(1, 6):  # what epoch e applied is what the phase after epoch e-1 recommends
        assert (log["lr_mult"][epoch], log["accumulation"][epoch]) == table[log["phase"][epoch - 1]]
    assert 2 in log["accumulation"]  # accumulation was exercised
    # The base schedule worked out by hand for base LR 0.01, 2 warmup epochs of 6: 0.005, 0.01, then
    # a cosine over the last 4 epochs, 0.01 * (1 + cos(pi * k / 4)) / 2 for k = 0..3.
    assert (cfg["base_lr"], cfg["warmup_epochs"], cfg["epochs"], cfg["dl_window"]) == (0.01, 2, 6, 3)
    base_lrs = [0.005, 0.01, 0.01, 0.01 * (2 + 2**0.5) / 4, 0.005, 0.01 * (2 - 2**0.5) / 4]
    losses = log["train_loss"]
    for epoch, base in enumerate(base_lrs):
        assert log["lr"][epoch] == pytest.approx(base * log["lr_mult"][epoch])
        assert results["baseline"]["per_epoch"]["lr"][epoch] == pytest.approx(base)
        w = min(3, epoch)  # dL: the mean of the last w first differences, 0 at the first epoch
        assert log["dL"][epoch] == pytest.approx((losses[epoch] - losses[epoch - w]) / w if w else 0.0)


def test_arms_are_bit_identical_until_the_multipliers_differ(default_run):
    _, results, _ = default_run
    base, phase = results["baseline"]["per_epoch"], results["phase_aware"]["per_epoch"]
    applied = list(zip(phase["lr_mult"], phase["accumulation"], strict=True))
    first = next(e for e, rec in enumerate(applied) if rec != (1.0, 1))
    assert first == 3
    for epoch in range(first):
        for key in ("train_loss", "train_acc", "eval_loss", "eval_acc"):
            assert base[key][epoch] == phase[key][epoch], (key, epoch)
    for epoch in range(first, 6):
        assert base["train_loss"][epoch] != phase["train_loss"][epoch]


def test_the_console_says_where_it_writes_first_and_what_it_wrote_last(default_run):
    out, _, stdout = default_run
    lines = stdout.splitlines()
    assert lines[0].endswith(f"writing to {out}")
    assert lines[-1] == f"seed 42: wrote {out / 'results_seed_42.json'} and figure_seed_42.png"


def test_one_progress_line_per_epoch_per_arm(default_run):
    _, _, stdout = default_run
    lines = [line for line in stdout.splitlines() if " epoch " in line and "ETA" in line]
    assert len(lines) == 12
    assert sum("phase_aware" in line and "accum" in line for line in lines) == 6
    assert "seed 42 transition after epoch 3: S0_EXPLORE -> S1_BOUNDARY" in stdout  # counted from 1


def test_channels_last_path_trains_too(tmp_path):
    # Width 16 is the narrowest that uses channels_last on a CPU.
    code, _, stderr = run_main(
        [*TINY, "--width", "16", "--epochs", "1", "--warmup-epochs", "0", "--subset", "64", "--output-dir", tmp_path]
    )
    assert code == 0, stderr
    results = read_json(tmp_path / "results_seed_42.json")
    assert results["config"]["memory_format"] == "channels_last"
    assert results["baseline"]["per_epoch"]["train_loss"] == results["phase_aware"]["per_epoch"]["train_loss"]


def test_a_model_copy_is_independent_of_the_other_arm():
    # Arms build their own model from the seed: training one leaves the other's start untouched.
    a = model.build_model(8, 7, torch.device("cpu"))
    start = copy.deepcopy(a.state_dict())
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    F.cross_entropy(a(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    b = model.build_model(8, 7, torch.device("cpu"))
    assert all(torch.equal(start[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected", [(False, False, False), (True, False, True), (False, True, True)]
)
def test_bf16_autocast_only_where_cpus_compute_it_natively(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert devices.native_bf16(torch.device("cpu")) is expected
    assert devices.native_bf16(torch.device("mps")) is False


# The head of a processor's entry in /proc/cpuinfo: an x86 virtual machine that names only a brand,
# and an ARM host that names no model at all.
EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (EPYC + "\n" + EPYC.replace(": 0", ": 1").replace("26", "25"), "AMD EPYC (cpu family 26, model 2)"),
        (EPYC.replace("cpu family\t: 26\nmodel\t\t: 2\n", ""), "AMD EPYC"),
        (EPYC.replace("AMD EPYC", ""), None),
        (ARM, None),
        ("", None),
    ],
)
def test_a_results_file_names_the_cpu_by_model_family_and_model_number(cpuinfo, expected):
    assert devices.cpu_model(cpuinfo) == expected


def test_bf16_autocast_computes_in_bf16():
    net = model.build_model(4, 0, torch.device("cpu"))
    with devices.autocast_for(torch.device("cpu"), "bf16-autocast"):
        assert net(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16
    with devices.autocast_for(torch.device("cpu"), "fp32"):
        assert net(torch.randn(2, 3, 32, 32)).dtype == torch.float32


@pytest.mark.parametrize(
    "flag, native, precision, dtype",  # dtype: of the training logits
    [
        ("on", False, "bf16-autocast", torch.bfloat16),  # emulated where not native: slow but works
        ("auto", True, "bf16-autocast", torch.bfloat16),
        ("auto", False, "fp32", torch.float32),
        ("off", True, "fp32", torch.float32),
    ],
)
def test_bf16_flag_decides_what_training_computes_in(tmp_path, monkeypatch, flag, native, precision, dtype):
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    seen, cross_entropy = set(), F.cross_entropy
    monkeypatch.setattr(
        torch.nn.functional,
        "cross_entropy",
        lambda logits, *a, **k: seen.add(logits.dtype) or cross_entropy(logits, *a, **k),
    )
    argv = [*TINY, "--epochs", "1", "--warmup-epochs", "0", "--subset", "64", "--bf16", flag, "--output-dir", tmp_path]
    code, _, stderr = run_main(argv)
    assert code == 0, stderr
    results = read_json(tmp_path / "results_seed_42.json")
    assert results["config"]["precision"] == precision and results["config"]["bf16"] == flag
    # Training logits come out of the model in bf16 under autocast; evaluation casts its own to fp32.
    assert (torch.bfloat16 in seen) is (dtype == torch.bfloat16) and results["baseline"]["status"] == "ok"


# ----- base schedule -----


def test_base_schedule_warmup_then_cosine():
    lrs = [model.base_lr_at(e, 0.01, 2, 30) for e in range(30)]
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)
    assert lrs[2] == pytest.approx(0.01)  # cosine starts at its peak
    assert lrs[16] == pytest.approx(0.005)  # half way through the 28 cosine epochs
    assert lrs[29] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 27 / 28)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))


def test_base_schedule_without_warmup():
    assert model.base_lr_at(0, 0.1, 0, 10) == pytest.approx(0.1)
    assert model.base_lr_at(5, 0.1, 0, 10) == pytest.approx(0.05)


def test_base_schedule_defaults():
    assert model.base_lr_at(0) == pytest.approx(model.BASE_LR / model.WARMUP_EPOCHS)
    assert model.base_lr_at(model.EPOCHS - 1) > 0


def test_the_seed_figure_lists_only_the_phases_in_force_and_when_each_was_detected():
    S0, S1, S2, _ = phase_controller.PHASES
    # Phases after epochs 1..4; epoch e trains at the phase held after epoch e-1, the first at S0.
    assert figures.phases_in_force([S0, S1, S1, S2]) == [S0, S0, S1, S1]
    labels = [h.get_label() for h in figures.phase_handles([S0, S1, S1, S2], {"S1": 1, "S2": 3})]
    assert labels == [
        "S0_EXPLORE in force",
        "S1_BOUNDARY in force",
        "detected (S1 after epoch 2, S2 after epoch 4); in force from the next epoch",
    ]
