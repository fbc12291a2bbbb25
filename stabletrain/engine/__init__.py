"""The engine adapter: every contact with DeepSpeed (initialisation, the step with its update veto, clipping,
checkpoints through DeepSpeed's own save/load) for data parallelism (deepspeed_engine.py) and pipeline stages
(pipeline.py), behind one interface (base.py)."""

from stabletrain import distributed  # noqa: F401  (sets DeepSpeed's accelerator before DeepSpeed is imported)
