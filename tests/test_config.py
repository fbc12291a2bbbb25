import re
import subprocess

import pytest
from omegaconf import OmegaConf

from stabletrain.config import ConfigError, register, validate
from stabletrain.engine.deepspeed_engine import deepspeed_config
from stabletrain.optim import lr_multiplier
from tests.helpers import PYTHON, REPO, composed, env, train

register()


def test_default_composes_and_validates():
    cfg = composed()
    validate(cfg)
    assert cfg.engine.zero_stage == 0 and cfg.precision.dtype == "fp32"
    assert cfg.data.source.train_files[0].startswith(str(REPO))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_engine_groups_generate_deepspeed_json(stage):
    cfg = composed(f"engine=zero{stage}", "precision=bf16", "trainer.grad_accum_steps=4")
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == cfg.trainer.micro_batch_size * 4 * 8
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


def test_offload_and_escape_hatch():
    cfg = composed(
        "engine=zero3",
        "engine.offload_optimizer=cpu",
        "engine.offload_param=cpu",
        "+engine.ds_config.zero_optimization.overlap_comm=true",
    )
    ds = deepspeed_config(cfg, 1)
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["zero_optimization"]["overlap_comm"] is True and ds["zero_optimization"]["stage"] == 3


def test_fp32_zero0_clips_in_the_trainer_not_in_deepspeed():
    # DeepSpeed does not report the pre-clip norm for plain fp32 ZeRO-0, so the trainer clips (and logs) it.
    assert deepspeed_config(composed(), 1)["gradient_clipping"] == 0.0


@pytest.mark.parametrize(
    "override, world, message",
    [
        ("model.n_heads=3", 1, "not divisible by model.n_heads"),
        ("model/attention=gqa", 1, "model.attention.n_kv_heads"),
        ("engine.offload_param=cpu", 1, "engine.offload_param needs engine.zero_stage=3"),
        ("trainer.stop_at=1000", 1, "trainer.stop_at=1000"),
        ("model=moe engine=zero3 engine.expert_parallel=2", 2, "expert_parallel=2 runs with engine.zero_stage 0-2"),
        ("model=moe engine.expert_parallel=2", 3, "engine.expert_parallel=2 does not divide the 3 data-parallel"),
        ("engine.pipeline_stages=2", 3, "engine.pipeline_stages=2 does not divide the number of ranks (3)"),
        ("engine=zero2 engine.pipeline_stages=2", 2, "refuses ZeRO-2"),
        ("precision=bf16 engine.pipeline_stages=2", 2, "needs engine=zero1"),
        ("engine.pipeline_stages=8", 8, "more than the 6 layers of the pipeline's layer list"),
        ("trainer.global_batch_size=6 trainer.micro_batch_size=4", 1, "global_batch_size=6 is not divisible"),
        ("trainer.global_batch_size=8 trainer.grad_accum_steps=2", 1, "not both"),
        ("data.source.train_files=[/nonexistent/x.jsonl]", 1, "file not found: /nonexistent/x.jsonl"),
    ],
)
def test_validation_errors_name_the_key(override, world, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(composed(*override.split()), world=world)


def test_schedules():
    cfg = composed("trainer.max_steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(55, cfg) == pytest.approx(0.55)  # cosine midpoint
    wsd = composed("trainer.max_steps=100", "optim.warmup_steps=10", "optim.schedule=wsd", "optim.decay_fraction=0.2")
    assert lr_multiplier(79, wsd) == 1.0 and lr_multiplier(90, wsd) == pytest.approx(0.55)
    assert lr_multiplier(100, wsd) == pytest.approx(0.1)
    horizon = composed("trainer.max_steps=50", "optim.total_steps=100", "optim.warmup_steps=10")
    assert lr_multiplier(55, horizon) == pytest.approx(0.55)  # the horizon, not max_steps, shapes the decay


def _train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "train.py", *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.not_a_key=1", "model.not_a_key"),
        ("model.d_model=wide", "model.d_model"),
        ("trainer.max_step=5", "trainer.max_step"),
    ],
)
def test_bad_override_fails_at_compose_time_naming_the_key(tmp_path, override, needle):
    # train.py itself for the first case; what it does, in this process, for the others
    proc = _train_py(override, "--cfg", "job") if "not_a_key" in override else train(tmp_path, override, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert needle in first and first.startswith("stabletrain: config error:"), proc.stderr


def test_cfg_job_prints_composed_config():
    proc = _train_py("engine=zero2", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.engine.zero_stage == 2 and cfg.model.name == "baseline"
