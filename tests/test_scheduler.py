"""PhaseScheduler on top of torch's schedulers, the relative slope, the README's own-loop example,
the package and the live progress line."""

import ast
import doctest
import math
import re
import subprocess
import sys
import tomllib

import numpy as np
import pytest
import torch
from helpers import ROOT, run_documented_code, run_main

import phase_controller as pc

pytestmark = pytest.mark.fast

# ----- a scripted loss curve that walks the controller through every phase -----

# dL (window 3) first falls below -0.02 at epoch 2: (2.0 - 2.3) / 2 = -0.15. |dL| first drops below
# 0.005 at epoch 7: (1.697 - 1.7) / 3 = -0.001. In S2 the eval losses 1.0, 1.0 give one improvement
# (epoch 8) and one stale evaluation (epoch 9): S3 at epoch 9 with patience 1.
LOSSES = [2.3, 2.2, 2.0, 1.8, 1.7, 1.699, 1.698, 1.697, 1.696, 1.695]
# The multiplier in force during each epoch (what the phase after the epoch before recommends),
# then after the last observation.
EXPECTED = [1.0, 1.0, 1.0, 1.1, 1.1, 1.1, 1.1, 1.1, 0.5, 0.5]
AFTER_LAST = 0.1
BATCHES = 4
EPOCHS = len(LOSSES)


def two_groups():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}], lr=0.1, momentum=0.9)


SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.97**s, lambda s: 1 / (1 + s)]),
    "MultiStepLR": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 13, 30], gamma=0.5),
    "ExponentialLR": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=17, eta_min=0.001),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[0.1, 0.02], total_steps=EPOCHS * BATCHES
    ),
}


def controller():
    return pc.PhaseController(s3_patience=1)


def step_through(scheduler, optimizer, epochs=range(EPOCHS)):
    """Per batch: an optimizer step, then scheduler.step(); per epoch: observe. The LRs after each call."""
    seen = []
    for epoch in epochs:
        for _ in range(BATCHES):
            optimizer.step()
            scheduler.step()
            seen.append(scheduler.get_last_lr())
        scheduler.observe(LOSSES[epoch], 1.0)
        seen.append(scheduler.get_last_lr())
    return seen


def reference_lrs(make_base):
    """The same scheduler on an untouched optimizer: the base LRs at the same points."""
    optimizer = two_groups()
    base = make_base(optimizer)
    seen = []
    for _ in range(EPOCHS):
        for _ in range(BATCHES):
            optimizer.step()
            base.step()
            seen.append([group["lr"] for group in optimizer.param_groups])
        seen.append([group["lr"] for group in optimizer.param_groups])
    return seen


def expected_multipliers():
    """Per recorded point: the batches of epoch e run at EXPECTED[e]; after observing epoch e,
    the next epoch's multiplier applies."""
    after = [*EXPECTED[1:], AFTER_LAST]
    return [m for e in range(EPOCHS) for m in [EXPECTED[e]] * BATCHES + [after[e]]]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_lrs_are_the_base_schedulers_own_times_the_multiplier(name):
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=SCHEDULERS[name](optimizer))
    assert scheduler.get_last_lr() == pytest.approx([0.1, 0.02] if name != "OneCycleLR" else [0.004, 0.0008])
    seen = step_through(scheduler, optimizer)
    for point, (lrs, ref, mult) in enumerate(
        zip(seen, reference_lrs(SCHEDULERS[name]), expected_multipliers(), strict=True)
    ):
        assert lrs == pytest.approx([r * mult for r in ref], rel=1e-12), (point, lrs, ref, mult)
    assert scheduler.controller.phase == "S3_POLISH" and scheduler.lr_mult == AFTER_LAST
    assert scheduler.accumulation == 2


def test_without_a_base_the_lrs_at_construction_are_the_constant_base():
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller())
    seen = step_through(scheduler, optimizer)
    assert seen == [pytest.approx([0.1 * m, 0.02 * m], rel=1e-12) for m in expected_multipliers()]


def test_without_a_controller_the_multiplier_is_constant():
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(
        optimizer, base=torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5), fixed_lr_mult=1.5
    )
    assert scheduler.get_last_lr() == pytest.approx([0.15, 0.03])
    optimizer.step()
    scheduler.step()
    scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.25 * 1.5, 0.02 * 0.25 * 1.5])


def test_reduce_lr_on_plateau_as_the_base():
    optimizer = two_groups()
    base = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=base)
    for epoch in range(4):
        scheduler.step(1.0)  # a flat metric: halved from the second call on
        scheduler.observe(LOSSES[epoch])
    # Base after four flat metrics: 0.1 * 0.5^3; the multiplier after epoch 3 is S1's.
    assert scheduler.get_last_lr() == pytest.approx([0.1 * 0.125 * 1.1, 0.02 * 0.125 * 1.1])


@pytest.mark.parametrize("name", ["MultiStepLR", "OneCycleLR", "CosineAnnealingLR"])
def test_a_restored_scheduler_continues_exactly(name):
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=SCHEDULERS[name](optimizer))
    uninterrupted = step_through(scheduler, optimizer)

    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=SCHEDULERS[name](optimizer))
    first = step_through(scheduler, optimizer, range(5))  # epoch 5: in S1, mid-schedule
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    restored_optimizer = two_groups()
    restored = pc.PhaseScheduler(restored_optimizer, controller(), base=SCHEDULERS[name](restored_optimizer))
    restored_optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["scheduler"])
    assert restored.get_last_lr() == first[-1] and restored.controller.phase == "S1_BOUNDARY"
    rest = step_through(restored, restored_optimizer, range(5, EPOCHS))
    assert first + rest == uninterrupted


def test_state_dict_covers_base_controller_and_multiplier():
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=SCHEDULERS["MultiStepLR"](optimizer))
    step_through(scheduler, optimizer, range(4))
    state = scheduler.state_dict()
    assert state["lr_mult"] == 1.1 and state["accumulation"] == 1
    assert state["controller"]["phase"] == "S1_BOUNDARY" and state["base"]["last_epoch"] == 16
    assert state["unscaled_lrs"] == pytest.approx([0.025, 0.005])  # 0.1 and 0.02, halved at steps 5 and 13
    assert state["base_lrs"] == [0.1, 0.02] and state["last_epoch"] == 16  # torch's meaning: initial LRs, steps


# ----- a torch LRScheduler, as frameworks check -----


def test_it_is_a_torch_lr_scheduler_and_construction_steps_nothing():
    optimizer = two_groups()
    base = SCHEDULERS["MultiStepLR"](optimizer)
    before = base.state_dict()
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=base)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    assert base.state_dict() == before and scheduler.last_epoch == 0  # the base was not stepped
    assert scheduler.base_lrs == [0.1, 0.02] and scheduler.get_last_lr() == [0.1, 0.02]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    # MultiStepLR halves at its fifth step; the controller is in S0 (multiplier 1).
    assert scheduler.last_epoch == 5 and scheduler.get_last_lr() == pytest.approx([0.05, 0.01])
    assert scheduler.get_lr() == pytest.approx([0.05, 0.01]) and scheduler.base_lrs == [0.1, 0.02]


def test_reduce_lr_on_plateau_keeps_the_invariants():
    optimizer = two_groups()
    base = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    scheduler = pc.PhaseScheduler(optimizer, controller(), base=base)
    for epoch, loss in enumerate(LOSSES[:5]):
        scheduler.step(1.0)  # flat: halved at every call from the second on
        scheduler.observe(loss, 1.0)
        halvings = epoch
        assert scheduler.unscaled_lrs == pytest.approx([0.1 * 0.5**halvings, 0.02 * 0.5**halvings])
        assert scheduler.get_last_lr() == pytest.approx([lr * scheduler.lr_mult for lr in scheduler.unscaled_lrs])
    assert scheduler.lr_mult == 1.1 and scheduler.last_epoch == 5  # S1 after epoch 2, as in LOSSES


def test_reprs_show_phase_multiplier_and_accumulation():
    ctl = pc.PhaseController(s3_patience=1)
    for loss in LOSSES[:3]:
        ctl.observe(loss)
    assert "phase=S1_BOUNDARY" in repr(ctl) and "s3_patience=1" in repr(ctl) and "lr_pulse=1.1" in repr(ctl)
    text = repr(pc.PhaseScheduler(two_groups(), ctl))
    assert "phase=S1_BOUNDARY" in text and "lr_mult=1.1" in text and "accumulation=1" in text


def test_without_a_controller_observe_returns_the_fixed_recommendation():
    scheduler = pc.PhaseScheduler(two_groups(), fixed_lr_mult=0.8)
    assert scheduler.observe(2.0, 1.0) == (0.8, 1) and scheduler.get_last_lr() == pytest.approx([0.08, 0.016])


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: pc.PhaseScheduler("an optimizer"), "optimizer must be a torch.optim.Optimizer"),
        (lambda: pc.PhaseScheduler(two_groups(), controller="S0"), "controller must be a PhaseController"),
        (lambda: pc.PhaseScheduler(two_groups(), base=0.1), "base must be a torch LR scheduler"),
        (lambda: pc.PhaseScheduler(two_groups(), fixed_lr_mult=0), "fixed_lr_mult must be > 0"),
        (lambda: pc.PhaseScheduler(two_groups(), fixed_lr_mult="1.0"), "fixed_lr_mult must be a number"),
        (lambda: pc.PhaseController(s1_threshold="-0.02"), "s1_threshold must be a number"),
        (lambda: pc.PhaseController(grad_accum=2.5), "grad_accum must be an integer"),
        (lambda: pc.PhaseController(dl_window=True), "dl_window must be a number"),
        (lambda: pc.PhaseController().observe(True), "train_loss must be a number"),
        (lambda: pc.PhaseController().observe("2.3"), "train_loss must be a number"),
        (lambda: pc.PhaseController().observe(2.3, eval_loss=[1.0]), "eval_loss must be a number"),
        (lambda: pc.PhaseScheduler(two_groups(), controller()).observe(None), "train_loss must be a number"),
    ],
)
def test_bad_input_to_the_classes_is_a_clear_error(make, error):
    with pytest.raises((TypeError, ValueError), match=error):
        make()


# ----- all or nothing: a state from a differently built scheduler, a grown optimizer, a failing base -----


def scheduler_at_epoch(optimizer, make_base=None, make_controller=controller, fixed=1.0, epochs=3):
    """A PhaseScheduler stepped through `epochs` epochs of the scripted curve."""
    base = make_base(optimizer) if make_base else None
    scheduler = pc.PhaseScheduler(optimizer, make_controller() if make_controller else None, base, fixed_lr_mult=fixed)
    step_through(scheduler, optimizer, range(epochs))
    return scheduler


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def everything(scheduler):
    return scheduler.state_dict(), [group["lr"] for group in scheduler.optimizer.param_groups]


@pytest.mark.parametrize(
    "saved, loader, message",
    [
        # A StepLR-based state into a constant base would run at 0.0125 where it ran at 0.003125.
        (dict(make_base=step_lr), dict(), "built without a base"),
        (dict(), dict(make_base=step_lr), "built with a base"),
        (dict(), dict(make_controller=None), "built without a controller"),  # its controller would be dropped
        (dict(make_controller=None), dict(), "built with a controller"),
        (dict(make_controller=None, fixed=2.0), dict(make_controller=None, fixed=0.5), "the fixed (0.5, 1)"),
    ],
    ids=["base into none", "none into a base", "controller into none", "none into a controller", "fixed 2 into 0.5"],
)
def test_a_state_from_a_differently_built_scheduler_is_refused_and_changes_nothing(saved, loader, message):
    state = scheduler_at_epoch(two_groups(), **saved).state_dict()
    target = scheduler_at_epoch(two_groups(), epochs=1, **loader)
    before = everything(target)
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(state)
    assert everything(target) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update(lr_mult=50.0), "is not what its phase asks"),
        (lambda s: s.update(accumulation=4), "is not what its phase asks"),
        (lambda s: s.update(unscaled_lrs=[10 * lr for lr in s["unscaled_lrs"]]), "the base's own LRs"),
        (lambda s: s.update(unscaled_lrs=[0.1]), "a finite LR per param group"),
        (lambda s: s.update(last_epoch=-1), "last_epoch"),
        (lambda s: s["controller"].update(best_eval=math.nan), "best_eval"),
    ],
)
def test_a_state_whose_parts_disagree_is_refused_and_changes_nothing(change, message):
    state = scheduler_at_epoch(two_groups(), make_base=step_lr, epochs=4).state_dict()  # in S1: (1.1, 1)
    change(state)
    target = scheduler_at_epoch(two_groups(), make_base=step_lr, epochs=2)
    before = everything(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert everything(target) == before


@pytest.mark.parametrize("state", ["x", None, [1, 2]])
def test_load_state_dict_of_a_non_dict_is_a_value_error(state):
    with pytest.raises(ValueError, match="not a PhaseScheduler state_dict"):
        pc.PhaseScheduler(two_groups(), controller()).load_state_dict(state)


def test_a_param_group_added_after_construction_is_a_clear_error_and_changes_nothing():
    optimizer = two_groups()
    scheduler = scheduler_at_epoch(optimizer, make_base=step_lr, epochs=3)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    before = everything(scheduler)
    for call in (scheduler.step, lambda: scheduler.observe(1.0)):
        with pytest.raises(ValueError, match="an optimizer of 3 param groups, not 2: build this after add_param_group"):
            call()
        assert everything(scheduler) == before


@pytest.mark.parametrize(
    "make_base",
    [
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),  # step() without its metric
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=2),  # stepped past its end
    ],
    ids=["ReduceLROnPlateau without its metric", "OneCycleLR past its total_steps"],
)
def test_a_base_step_that_raises_leaves_the_scheduler_and_the_optimizer_as_they_were(make_base):
    optimizer = two_groups()
    scheduler = pc.PhaseScheduler(optimizer, controller(), make_base(optimizer))
    for loss in LOSSES[:3]:  # into S1: the optimizer runs at 1.1 times the base's LRs
        scheduler.observe(loss)
    with pytest.raises((TypeError, ValueError)):
        for _ in range(5):
            before = everything(scheduler)
            optimizer.step()
            scheduler.step()
    assert everything(scheduler) == before and scheduler.lr_mult == 1.1
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(
        [lr * 1.1 for lr in scheduler.unscaled_lrs]
    )


def test_losses_may_be_numpy_or_torch_numbers():
    ctl = pc.PhaseController()
    ctl.observe(np.float32(2.5))
    ctl.observe(torch.tensor(2.0))
    assert ctl.recent_losses == [2.5, 2.0] and ctl.dL == pytest.approx(-0.5)


# ----- the relative slope -----


def test_relative_slope_divides_by_the_latest_loss():
    ctl = pc.PhaseController(dl_mode="relative")
    for loss in (1.0, 0.9, 0.8):
        ctl.observe(loss)
    # (0.8 - 1.0) / 2 = -0.1 per epoch; -0.1 / 0.8 = -0.125 of the loss per epoch.
    assert ctl.dL == pytest.approx(-0.125)


@pytest.mark.parametrize(
    "slope, phases",
    [
        # At a loss of 0.1 an absolute slope of -0.01/epoch is above s1_threshold -0.02: no S1.
        # Relative: -0.01 / 0.08 = -0.125, S1 at epoch 2; then (0.0798 - 0.1) / 3 / 0.0798 = -0.084,
        # still falling ten times faster than s2_threshold: no S2.
        ("absolute", ["S0_EXPLORE"] * 4),
        ("relative", ["S0_EXPLORE", "S0_EXPLORE", "S1_BOUNDARY", "S1_BOUNDARY"]),
    ],
)
def test_relative_slope_sees_a_small_loss_fall(slope, phases):
    ctl = pc.PhaseController(dl_mode=slope)
    seen = [(ctl.observe(loss), ctl.phase)[1] for loss in (0.1, 0.09, 0.08, 0.0798)]
    assert seen == phases


def test_relative_slope_refuses_non_positive_losses():
    with pytest.raises(ValueError, match="positive training losses"):
        pc.PhaseController(dl_mode="relative").observe(0.0)
    with pytest.raises(ValueError, match="dl_mode must be"):
        pc.PhaseController(dl_mode="percent")


def test_replay_with_a_relative_slope(tmp_path):
    path = tmp_path / "small.json"
    path.write_text("[0.1, 0.09, 0.08, 0.0798]")
    code, stdout, _ = run_main(["--replay", path, "--dl-mode", "relative", "--output-dir", tmp_path])
    assert code == 0 and "transition after epoch 3: S0_EXPLORE -> S1_BOUNDARY (dL -0.1250" in stdout
    code, stdout, _ = run_main(["--replay", path, "--output-dir", tmp_path])
    assert code == 0 and "transition" not in stdout


# ----- the README's own-loop example, extracted and run -----


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = run_documented_code("README.md", "## Using `PhaseController` in your own loop")
    scheduler, base = namespace["scheduler"], namespace["base"]
    assert scheduler.get_last_lr() == pytest.approx([base.get_last_lr()[0] * scheduler.lr_mult], rel=1e-12)
    assert scheduler.controller.phase != "S0_EXPLORE"  # it learned, and the controller saw it
    restored = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert restored["scheduler"]["controller"]["phase"] == scheduler.controller.phase
    assert capsys.readouterr().out.count("\n") == namespace["epochs"]


# ----- the package -----


def test_package_dependencies_are_the_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert project["dependencies"] == ["torch>=2.4"]  # the library: torch alone
    requirements = [line for line in lines if line and not line.startswith("#")]
    assert requirements == project["dependencies"] + project["optional-dependencies"]["demo"]
    assert project["scripts"] == {"phase-controller": "phase_cifar10:main"}


# Run before anything else in a child process: numpy, matplotlib and torchvision cannot be imported.
WITHOUT_DEMO_PACKAGES = """
import sys
sys.modules.update(numpy=None, matplotlib=None, torchvision=None)  # importing them raises ImportError
"""


def test_the_library_works_without_the_experiments_packages():
    code = WITHOUT_DEMO_PACKAGES + (
        "import torch, phase_controller as pc\n"
        "opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)\n"
        "s = pc.PhaseScheduler(opt, pc.PhaseController(s1_threshold=-0.05))\n"
        "print([s.observe(loss).lr_mult for loss in (2.0, 1.9, 1.7)])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[1.0, 1.0, 1.1]\n"


def test_the_command_without_the_experiments_packages_says_what_to_install():
    code = WITHOUT_DEMO_PACKAGES + "sys.argv = ['phase_controller.py', '--help']\nimport runpy\n"
    code += "runpy.run_path('phase_controller.py', run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # torch itself may warn that it found no numpy; the command adds one line and no traceback.
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert "error: the experiment needs numpy and matplotlib" in result.stderr.splitlines()[-1]
    assert "pip install numpy matplotlib" in result.stderr.splitlines()[-1]


def test_the_library_file_is_small_reads_first_and_imports_only_torch():
    source = (ROOT / "phase_controller.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports == {"copy", "math", "typing", "torch"} and source.count("\n") <= 400
    tree = ast.parse(source)  # the docstring, then the mechanism; the experiment's entry point last
    assert isinstance(tree.body[1], ast.Import) and "__main__" in ast.unparse(tree.body[-1].test)


def test_the_docstring_examples_run():
    failed, attempted = doctest.testmod(pc)
    assert failed == 0 and attempted >= 9  # every example of the Args docstrings
