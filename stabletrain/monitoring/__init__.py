"""Monitoring callbacks (each registers itself under its name in the callback registry): metric sinks
(console, metrics files, W&B), signal-gain diagnostics, spike forensics; and plot helpers."""

from stabletrain.monitoring import forensics, fp8_stats, gains, sinks  # noqa: F401  (they register themselves)
