"""Adapting the plain model to the hardware, from outside it: FP8 Linears, activation recomputation, expert
parallelism and compilation applied by `parallelize` in a fixed order (parallelize.py), then each rank's parameters
materialized on its device with layout-independent initial values (materialize.py)."""
