"""Training, evaluation, attacks and inference loops, checkpoints and the runtime (devices,
precision, distributed). Import the submodules directly."""
