"""Training, evaluation, attack and inference loops, checkpoints and the runtime (devices, precision,
distributed). Import the submodules directly; nothing is imported here, so ``import
fakescope.engine.runtime`` stays light. Among them:

* :mod:`~fakescope.engine.runtime`: device, precision, torch.compile, torchrun's process group;
* :mod:`~fakescope.engine.sources`: what feeds the training loop (cached features, images in memory,
  streamed files) and the unreadable files each source skips;
* :mod:`~fakescope.engine.features` and :mod:`~fakescope.engine.feature_cache`: frozen-backbone
  features, computed once and kept in a memory-mapped on-disk cache;
* :mod:`~fakescope.engine.train`: the training loop (``TrainOptions``, ``train``);
* :mod:`~fakescope.engine.checkpoint`: run directories (safetensors + JSON);
* :mod:`~fakescope.engine.infer`: scoring files and evaluating an index;
* :mod:`~fakescope.engine.calibrate`: scoring a calibration set (a root's split, or the run's own
  held-out training images) and fitting temperature scaling and a threshold (returns data).
"""
