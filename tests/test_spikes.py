"""Spike detectors, the update veto, the schedule rewind and skip lists (unit level; end to end in test_spikes_e2e)."""

import pytest
import torch

from stabletrain.config import DetectorConfig, MonitorConfig
from stabletrain.optim import GatedAdamW, UpdateGate, rewind_scheduler
from stabletrain.training.detectors import RollingDetector, SkipList, SpikeMonitor


def noisy(n, mean=3.0, sd=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (mean + sd * torch.randn(n, generator=g)).tolist()


def test_zscore_fires_above_sigma_only_after_warmup():
    det = RollingDetector("loss", DetectorConfig(window=128, sigma=6.0), warmup=64)
    values = noisy(200)
    for v in values[:63]:
        assert det.check(10.0) is None  # warm-up: silent however large the value
        det.accept(v)
    det.accept(values[63])
    window = torch.tensor(values[:64], dtype=torch.float64)
    threshold = (window.mean() + 6 * window.std()).item()
    assert det.check(threshold * 0.999) is None
    firing = det.check(threshold * 1.001)
    assert firing.rule == "zscore" and firing.threshold == pytest.approx(threshold)


def test_window_keeps_only_the_last_values():
    det = RollingDetector("loss", DetectorConfig(window=4, sigma=6.0), warmup=0)
    for v in [100.0, 100.0, 1.0, 1.1, 0.9, 1.0]:
        det.accept(v)
    assert list(det.values) == [1.0, 1.1, 0.9, 1.0]
    assert det.check(2.0) is not None  # with the two 100s still in the window this would pass


def test_max_ratio_and_min_ratio_rules():
    det = RollingDetector("grad_norm", DetectorConfig(window=8, sigma=6.0, min_ratio=3.0, max_ratio=10.0), warmup=0)
    for v in [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]:
        det.accept(v)
    assert det.check(2.5) is None  # many sigmas, but under 3x the mean: small-batch noise
    assert det.check(3.5).rule == "zscore"
    off = RollingDetector("grad_norm", DetectorConfig(window=8, sigma=0.0, max_ratio=10.0), warmup=0)
    for v in [1.0, 2.0]:
        off.accept(v)
    assert off.check(19.0) is None and off.check(21.0).rule == "max_ratio"


def test_monitor_responses_severity_nonfinite_and_window_hygiene():
    cfg = MonitorConfig(warmup_steps=8, response="log")
    cfg.grad_norm.response = "rollback"
    mon = SpikeMonitor(cfg)
    for step, (loss, gn) in enumerate(zip(noisy(20), noisy(20, 1.0, 0.02, seed=1)), 1):
        assert not mon.judge(step, loss, gn).fired
    v = mon.judge(21, 30.0, 50.0)
    assert {f.metric for f in v.firings} == {"loss", "grad_norm"}
    assert v.response == "rollback" and not v.applied  # the more severe of log (loss) and rollback (grad norm)
    assert len(mon.detectors["loss"].values) == 20  # a spike does not widen the band for the next one
    only_loss = mon.judge(22, 30.0, 1.0)
    assert only_loss.response == "log" and only_loss.applied
    nan = mon.judge(23, float("nan"), None)
    assert nan.firings[0].kind == "nonfinite" and nan.response == "skip_step" and not nan.applied
    early = SpikeMonitor(MonitorConfig(warmup_steps=1000)).judge(1, 3.0, float("inf"))
    assert early.firings[0].kind == "nonfinite" and not early.applied  # no warm-up for NaN/Inf


def test_monitor_state_round_trips():
    mon = SpikeMonitor(MonitorConfig(warmup_steps=2))
    for step, loss in enumerate(noisy(10), 1):
        mon.judge(step, loss, 1.0)
    other = SpikeMonitor(MonitorConfig(warmup_steps=2))
    other.load_state_dict(mon.state_dict())
    assert other.state_dict() == mon.state_dict()
    assert other.judge(11, 99.0, 1.0).fired == mon.judge(11, 99.0, 1.0).fired is True


@pytest.mark.parametrize("fused", [None, True])  # True: the fused kernel the engine uses on a GPU
def test_vetoed_update_leaves_weights_and_moments_untouched(fused):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    opt = GatedAdamW([w], lr=0.1, fused=fused)
    for _ in range(2):
        w.grad = torch.randn(5)
        opt.step()
    before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
    calls = []
    opt.gate = UpdateGate(lambda: None, lambda norm: calls.append(1) or False)
    w.grad = torch.full((5,), float("nan"))
    opt.step()
    opt.step()  # DeepSpeed calls step() once per parameter group: one answer for the engine step
    assert opt.reset_gate() is False and calls == [1]
    assert torch.equal(w.detach(), before[0])
    assert all(torch.equal(opt.state[w][k], v) for k, v in before[1].items())
    w.grad = torch.ones(5)
    opt.step()  # gate cleared: updates again
    assert not torch.equal(w.detach(), before[0]) and opt.reset_gate() is None


def test_rewind_scheduler_restores_the_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        opt.step()
        sched.step()
    epoch, lr = sched.last_epoch, opt.param_groups[0]["lr"]
    sched.step()
    rewind_scheduler(sched, epoch)
    assert sched.last_epoch == epoch and opt.param_groups[0]["lr"] == pytest.approx(lr)


def test_skip_list_jumps_over_overlapping_ranges():
    skips = SkipList([[5, 8], [7, 10]])
    assert [skips.next_allowed(b) for b in (4, 5, 9, 10)] == [4, 10, 10, 10]
    skips.merge([[5, 8], [12, 13]])
    assert skips.ranges == [[5, 8], [7, 10], [12, 13]]
    assert skips.next_allowed(12) == 13
