"""PhaseController rules, case by case: dL, every transition, the recommendations, state and arguments."""

import io
import math
import random

import pytest
import torch

import phase_controller as pc
from phase_controller import PhaseController, dL_of

pytestmark = pytest.mark.fast


def feed(controller, losses, eval_losses=None):
    eval_losses = eval_losses or [None] * len(losses)
    return [controller.observe(loss, ev) for loss, ev in zip(losses, eval_losses, strict=True)]


def controller_in_s2(**kwargs):
    """A controller that entered S2 on its 4th observation (epoch 3)."""
    ctl = PhaseController(s1_threshold=-0.01, s2_threshold=0.05, **kwargs)
    feed(ctl, [2.0, 1.5, 1.0])  # dL -0.5 at n=3: S1 at epoch 2
    ctl.observe(0.99, eval_loss=0.5)  # dL (0.99-2.0)/3 = -0.337: stays S1
    ctl.observe(0.98, eval_loss=0.5)  # dL (0.98-1.5)/3 = -0.173: stays S1
    ctl.observe(0.97, eval_loss=0.5)  # dL (0.97-1.0)/3 = -0.01: |dL| < 0.05, S2 at epoch 5
    assert ctl.phase == pc.S2_AXIS_LOCK and ctl.transition_epochs == {"S1": 2, "S2": 5}
    return ctl


# ----- dL -----


@pytest.mark.parametrize(
    "losses, window, expected",
    [
        ([], 3, 0.0),
        ([2.0], 3, 0.0),
        ([2.0, 1.5], 3, -0.5),  # w = min(3, 1) = 1
        ([2.0, 1.5, 1.25], 3, (1.25 - 2.0) / 2),  # w = 2
        ([4.0, 3.0, 2.0, 1.0, 0.5], 3, (0.5 - 3.0) / 3),  # last 3 differences only
        ([4.0, 3.0, 2.0, 1.0, 0.5], 1, -0.5),
    ],
)
def test_dL_is_the_mean_of_the_last_w_first_differences(losses, window, expected):
    assert dL_of(losses, window) == pytest.approx(expected, abs=1e-15)


def test_controller_exposes_latest_dl():
    ctl = PhaseController(s1_threshold=-100.0)  # never leaves S0
    losses = [2.3, 2.1, 1.8, 1.7, 1.69]
    # Window 3, worked by hand: 0 before two losses, then (L[n-1] - L[n-1-w]) / w with w = min(3, n-1).
    expected = [0.0, 2.1 - 2.3, (1.8 - 2.3) / 2, (1.7 - 2.3) / 3, (1.69 - 2.1) / 3]
    for loss, dl in zip(losses, expected, strict=True):
        ctl.observe(loss)
        assert ctl.dL == pytest.approx(dl, abs=1e-12)
    # It keeps what dL needs, the last window + 1 losses, so its state does not grow with training.
    assert ctl.recent_losses == losses[-4:] and ctl.epochs_seen == 5


# ----- S0 -> S1 -----


def test_s1_needs_three_observations():
    ctl = PhaseController()
    assert ctl.observe(3.0) == (1.0, 1)
    ctl.observe(1.0)  # dL = -2 but only two losses seen
    assert ctl.phase == pc.S0_EXPLORE
    lr_mult, accum = ctl.observe(0.9)  # dL = (0.9 - 3) / 2
    assert ctl.phase == pc.S1_BOUNDARY
    assert (lr_mult, accum) == (1.10, 1)
    assert ctl.transition_epochs == {"S1": 2}


def test_s1_threshold_is_strict():
    ctl = PhaseController(s1_threshold=-0.25)
    feed(ctl, [2.0, 1.75, 1.5])  # dL exactly -0.25
    assert ctl.phase == pc.S0_EXPLORE
    ctl.observe(1.0)  # dL = (1.0 - 2.0) / 3
    assert ctl.phase == pc.S1_BOUNDARY
    assert ctl.transition_epochs == {"S1": 3}


def test_flat_loss_stays_in_s0():
    ctl = PhaseController()
    feed(ctl, [2.0] * 20, [1.0] * 20)
    assert ctl.phase == pc.S0_EXPLORE and ctl.transitions == []


# ----- S1 -> S2 -----


def test_at_most_one_transition_per_call():
    # The 3rd loss satisfies both the S0->S1 and the S1->S2 conditions; only S0->S1 happens.
    ctl = PhaseController(s1_threshold=-0.01, s2_threshold=0.5)
    feed(ctl, [1.0, 0.9, 0.8])
    assert ctl.phase == pc.S1_BOUNDARY
    ctl.observe(0.7)
    assert ctl.phase == pc.S2_AXIS_LOCK
    assert ctl.transition_epochs == {"S1": 2, "S2": 3}


def test_s1_to_s2_uses_absolute_dl():
    ctl = PhaseController(s1_threshold=-0.01, s2_threshold=0.05)
    feed(ctl, [2.0, 1.5, 1.0])
    ctl.observe(2.2)  # dL = (2.2 - 2.0) / 3 = +0.067: |dL| too large
    assert ctl.phase == pc.S1_BOUNDARY
    ctl.observe(1.55)  # dL = (1.55 - 1.5) / 3 = +0.0167
    assert ctl.phase == pc.S2_AXIS_LOCK


def test_s2_threshold_is_strict():
    # Window 1: dL is the last difference, exact in binary. |dL| == s2_threshold does not lock the axis.
    ctl = PhaseController(s1_threshold=-0.01, s2_threshold=0.25, dl_window=1)
    feed(ctl, [2.0, 1.5, 1.0])  # dL -0.5: S1 at epoch 2
    feed(ctl, [0.75, 0.5])  # dL exactly -0.25 twice
    assert ctl.phase == pc.S1_BOUNDARY and ctl.dL == -0.25
    ctl.observe(0.375)  # dL -0.125
    assert ctl.phase == pc.S2_AXIS_LOCK and ctl.transition_epochs == {"S1": 2, "S2": 5}


# ----- S2 -> S3 -----


def test_call_entering_s2_does_not_count_its_eval_loss():
    ctl = controller_in_s2()
    assert ctl.best_eval == math.inf and ctl.stale == 0


def test_s2_counts_stale_evaluations_then_enters_s3():
    ctl = controller_in_s2(s3_patience=3)
    ctl.observe(0.97, eval_loss=1.0)  # best 1.0
    assert (ctl.best_eval, ctl.stale) == (1.0, 0)
    ctl.observe(0.97, eval_loss=1.0 - 0.5e-4)  # not better by 1e-4: stale
    assert (ctl.best_eval, ctl.stale) == (1.0, 1)
    ctl.observe(0.97, eval_loss=0.9)  # better: reset
    assert (ctl.best_eval, ctl.stale) == (0.9, 0)
    ctl.observe(0.97, eval_loss=0.95)
    ctl.observe(0.97, eval_loss=0.9)
    assert ctl.phase == pc.S2_AXIS_LOCK and ctl.stale == 2
    lr_mult, accum = ctl.observe(0.97, eval_loss=0.91)
    assert ctl.phase == pc.S3_POLISH and ctl.stale == 3
    assert (lr_mult, accum) == (0.1, 2)
    assert ctl.transition_epochs == {"S1": 2, "S2": 5, "S3": 11}


def test_call_without_eval_loss_changes_nothing_in_s2():
    ctl = controller_in_s2(s3_patience=2)
    ctl.observe(0.97, eval_loss=1.0)
    ctl.observe(0.97, eval_loss=1.0)
    before = ctl.state_dict()
    for _ in range(5):
        assert ctl.observe(0.97) == (0.5, 2)
    assert ctl.phase == pc.S2_AXIS_LOCK
    assert (ctl.best_eval, ctl.stale) == (before["best_eval"], before["stale"])


def test_s3_is_final():
    ctl = controller_in_s2(s3_patience=1)
    ctl.observe(0.97, eval_loss=1.0)
    ctl.observe(0.97, eval_loss=1.0)
    assert ctl.phase == pc.S3_POLISH
    feed(ctl, [5.0, 0.1, 9.0, 0.01], [0.1, 5.0, 0.01, 7.0])
    assert ctl.phase == pc.S3_POLISH and len(ctl.transitions) == 3


# ----- recommendations -----


def test_recommendation_table_by_phase():
    ctl = PhaseController(lr_pulse=1.3, grad_accum=4)
    expected = {pc.S0_EXPLORE: (1.0, 1), pc.S1_BOUNDARY: (1.3, 1), pc.S2_AXIS_LOCK: (0.5, 4), pc.S3_POLISH: (0.1, 4)}
    for phase, rec in expected.items():
        ctl.phase = phase
        assert ctl.recommendation() == rec
        assert ctl.recommendation().lr_mult == rec[0] and ctl.recommendation().accumulation == rec[1]


def test_multipliers_never_compound():
    ctl = PhaseController(s2_threshold=0.0)  # S1 is never left
    recs = feed(ctl, [3.0 - 0.2 * i for i in range(12)])
    assert ctl.phase == pc.S1_BOUNDARY
    assert all(rec == (1.10, 1) for rec in recs[2:])


def test_transition_lines_are_readable():
    ctl = controller_in_s2()
    assert len(ctl.transitions) == 2
    assert ctl.transitions[0].startswith("after epoch 3: S0_EXPLORE -> S1_BOUNDARY (dL -0.5000")
    assert ctl.transitions[1].startswith("after epoch 6: S1_BOUNDARY -> S2_AXIS_LOCK")


# ----- state_dict -----


def checkpoint_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def random_run(rng, n):
    """A noisy, decaying loss curve with eval losses, long enough to visit every phase."""
    losses = [2.3 * math.exp(-0.25 * i) + 0.3 + rng.uniform(-0.003, 0.003) for i in range(n)]
    evals = [None if rng.random() < 0.2 else 0.5 + rng.uniform(0, 0.01) for _ in range(n)]
    return losses, evals


@pytest.mark.parametrize("split", [1, 3, 7, 12, 20, 29, 39])
def test_restored_controller_continues_exactly_like_uninterrupted(split):
    rng = random.Random(split)
    losses, evals = random_run(rng, 40)
    settings = dict(s1_threshold=-0.05, s2_threshold=0.03, s3_patience=3)
    whole = PhaseController(**settings)
    whole_recs = feed(whole, losses, evals)
    assert whole.phase == pc.S3_POLISH  # the curve visits every phase

    first = PhaseController(**settings)
    recs = feed(first, losses[:split], evals[:split])
    restored = PhaseController()  # other settings: the state dict carries them
    restored.load_state_dict(checkpoint_round_trip(first.state_dict()))
    recs += feed(restored, losses[split:], evals[split:])
    assert recs == whole_recs
    assert restored.state_dict() == whole.state_dict()


def test_state_dict_carries_every_counter():
    ctl = controller_in_s2()
    ctl.observe(0.97, eval_loss=1.0)
    ctl.observe(0.97, eval_loss=1.0)
    state = ctl.state_dict()
    assert state["recent_losses"] == ctl.recent_losses and state["phase"] == pc.S2_AXIS_LOCK
    assert (state["best_eval"], state["stale"], state["epochs_seen"]) == (1.0, 1, 8)
    assert state["transitions"] == ctl.transitions and state["transition_epochs"] == {"S1": 2, "S2": 5}
    state["recent_losses"].append(123.0)  # a copy, not a view
    assert 123.0 not in ctl.recent_losses


def test_load_state_dict_refuses_incomplete_state():
    state = PhaseController().state_dict()
    del state["stale"]
    with pytest.raises(ValueError, match="not a PhaseController state_dict"):
        PhaseController().load_state_dict(state)


@pytest.mark.parametrize(
    "key, value",
    [
        ("grad_accum", -3), ("dl_mode", "weird"), ("s2_threshold", math.inf), ("phase", "S9_NONSENSE"),
        ("stale", -1), ("stale", 1.5), ("recent_losses", "2.0, 1.9"), ("recent_losses", [1.0, math.nan, 1.0, 1.0]),
        ("dL", None), ("transition_epochs", {"S1": 99}), ("transition_epochs", {"S7": 0}), ("transitions", [3]),
        # States no sequence of losses can leave: each refused by a rule of its own.
        ("best_eval", math.nan), ("transition_epochs", {"S1": True, "S2": 5}), ("epochs_seen", 2),
        ("transition_epochs", {"S1": 5, "S2": 2}), ("transition_epochs", {"S1": 2}), ("recent_losses", [1.0, 0.9]),
        ("phase", pc.S0_EXPLORE), ("transitions", ["one line"]), ("epochs_seen", True),
    ],
)  # fmt: skip
def test_load_state_dict_refuses_a_bad_entry_and_leaves_the_controller_as_it_was(key, value):
    ctl = controller_in_s2()
    before = ctl.state_dict()
    state = ctl.state_dict() | {key: value}
    with pytest.raises((TypeError, ValueError)):
        PhaseController().load_state_dict(state)
    with pytest.raises((TypeError, ValueError)):
        ctl.load_state_dict(state)
    assert ctl.state_dict() == before


def test_metrics_are_flat_numbers_and_the_phase_name():
    ctl = controller_in_s2()
    assert ctl.metrics() == {"phase": "S2_AXIS_LOCK", "phase_index": 2, "dL": ctl.dL, "lr_mult": 0.5,
                             "accumulation": 2, "epochs_seen": 6}  # fmt: skip
    assert PhaseController().metrics() == {"phase": "S0_EXPLORE", "phase_index": 0, "dL": 0.0, "lr_mult": 1.0,
                                           "accumulation": 1, "epochs_seen": 0}  # fmt: skip


# ----- argument checks -----


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(s2_threshold=-0.1),
        dict(lr_pulse=0.0),
        dict(lr_pulse=math.nan),
        dict(grad_accum=0),
        dict(s3_patience=0),
        dict(dl_window=0),
        dict(dl_window=1.5),
        dict(s1_threshold=math.inf),
        dict(grad_accum=math.inf),
        dict(s3_patience=-math.inf),
        dict(dl_window=math.nan),
    ],
)
def test_constructor_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        PhaseController(**kwargs)


@pytest.mark.parametrize("train_loss, eval_loss", [(math.nan, None), (math.inf, 1.0), (1.0, math.nan)])
def test_observe_refuses_non_finite_losses(train_loss, eval_loss):
    ctl = PhaseController()
    with pytest.raises(ValueError):
        ctl.observe(train_loss, eval_loss)
    assert ctl.recent_losses == [] and ctl.epochs_seen == 0


@pytest.mark.parametrize("window", [0, -1, 1.5, math.inf])
def test_dL_refuses_a_window_below_one(window):
    with pytest.raises(ValueError, match="dl_window"):
        dL_of([2.0, 1.0], window)


class EveryOtherEpoch(PhaseController):
    """Another rule, as a subclass writes one: the next phase after every second epoch."""

    def next_phase(self, eval_loss):
        if self.epochs_seen % 2 == 0 and self.phase != pc.S3_POLISH:
            return pc.PHASES[pc.PHASES.index(self.phase) + 1], "an even epoch"
        return None


def test_a_subclass_changes_the_rules_and_keeps_the_rest():
    ctl = EveryOtherEpoch(lr_pulse=1.3, grad_accum=4)
    recommended = feed(ctl, [1.0] * 8)  # flat losses: the default rules would never leave S0
    assert [r.lr_mult for r in recommended] == [1.0, 1.3, 1.3, 0.5, 0.5, 0.1, 0.1, 0.1]
    assert [r.accumulation for r in recommended] == [1, 1, 1, 4, 4, 4, 4, 4]
    assert ctl.transition_epochs == {"S1": 1, "S2": 3, "S3": 5}
    assert ctl.transitions[0] == "after epoch 2: S0_EXPLORE -> S1_BOUNDARY (an even epoch)"
    restored = EveryOtherEpoch(lr_pulse=1.3, grad_accum=4)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict() and restored.recommendation() == (0.1, 4)
