"""The configuration is read-only after validation; derived values live in resolved.yaml beside config.yaml and are
read back by the tools; the planner's own entry point prints what trainer.plan=true prints."""

import contextlib
import io

import pytest
import yaml

from stabletrain.cli.plan import main as plan_main
from stabletrain.config.frozen import FrozenConfigError, freeze, is_frozen, thawed
from stabletrain.config.resolved import load_resolved
from stabletrain.interop.run import load_run
from stabletrain.training.trainer import Trainer
from tests.helpers import composed, train


def test_a_frozen_config_refuses_assignments_anywhere_in_the_tree_and_thawed_copies_do_not():
    cfg = freeze(composed("model=mhc"))
    for node, key in ((cfg.trainer, "max_steps"), (cfg.model.residual, "kernel"), (cfg.model, "vocab_size")):
        with pytest.raises(FrozenConfigError, match=f"{key} cannot be set"):
            setattr(node, key, 1)
    copy = thawed(cfg.model)
    copy.residual.kernel = "fused"
    assert cfg.model.residual.kernel == "eager" and not is_frozen(copy) and is_frozen(cfg.model.residual)
    composed().trainer.max_steps = 3  # other instances of the same classes stay writable


def test_a_run_trains_on_a_frozen_config_and_writes_what_it_derived(tmp_path, monkeypatch):
    seen, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: seen.append(is_frozen(self.cfg.model.ffn)) or fit(self))
    run = tmp_path / "run"
    train(run, "trainer.max_steps=2", "trainer.eval_interval=0", "logging=none")
    assert seen == [True]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] is None  # config.yaml: as composed
    resolved = load_resolved(run)
    assert resolved.vocab_size == 4096 and resolved.global_batch_size == 8 and resolved.world_size == 1
    assert load_run(run).model_cfg.vocab_size == 4096
    (run / "resolved.yaml").write_text((run / "resolved.yaml").read_text().replace("4096", "4000"))
    with pytest.raises(Exception, match="size mismatch|do not fit"):  # the tools believe resolved.yaml
        load_run(run).model()


def test_the_planner_entry_point_prints_what_trainer_plan_prints(tmp_path):
    args = ["model=mhc_27b", "precision=bf16", "engine=zero1", "trainer.plan_world_size=64"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plan_main(args)
    proc = train(None, *args, "trainer.plan=true", tiny=False)
    via_train = proc.stdout.replace("logging.progress=false ", "")  # the helper's own override, in the commands
    assert out.getvalue().strip() and out.getvalue().strip() == via_train.strip()
