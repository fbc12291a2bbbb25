"""stabletrain's Hydra launcher plugin (hydra/launcher=torchrun), found by Hydra in the hydra_plugins namespace."""
