"""The network benchmarks' communication-bound models, by name (`--model`).

Each module has init_params(seed), batch(rng, rows), loss_fn(params, inputs, labels),
PER_PROCESS_BATCH and DESCRIPTION.
"""

from benchmarks import bag, mlp

MODELS = {"mlp": mlp, "bag": bag}
