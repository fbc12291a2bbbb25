"""The engine: DeepSpeed (initialisation, the step, checkpoints, safe loading) and expert parallelism."""

from stabletrain import distributed  # noqa: F401  (sets DeepSpeed's accelerator before DeepSpeed is imported)
