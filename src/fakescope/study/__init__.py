"""The study as library functions: the benchmark and the cross-generator protocol.

:func:`run_benchmark` trains every model of a configuration on the train split of all selected
generators (one run directory per model and seed, each a normal run that ``fakescope evaluate``
and ``predict`` accept), evaluates each run on the val split, overall and per generator, and
returns (and writes) the results table with the report. :func:`run_cross` is GenImage's
cross-generator protocol: train on each generator alone and test on every generator (an N x N
accuracy matrix), or train on all generators but one and test on the one left out.

A configuration is a mapping (from YAML, TOML or JSON, or built by the CLI)::

    data: /data/genimage            # required
    out: runs/benchmark
    models:                         # a list of names, or label -> options
      cnn32: {}
      cnn32-small: {model: cnn32, filters: [8, 16, 32]}
      timm:tf_efficientnet_lite0: {pretrained_file: weights.safetensors, freeze: true}
    seeds: [42, 43, 44]
    epochs: 10
    degrade: ["jpeg:95,75,50,30", "blur:1,2,3", "resize:0.5,0.25"]
    jpeg_align: 75                  # shortcut control (see below)
    augment: {jpeg_prob: 0.1, blur_prob: 0.1, flip: true}
    cross: true                     # also the cross-generator matrix of every model

Every value is checked with the command line's rules and a bad one is a one-line error naming its
key (:mod:`fakescope.study.config`). Per-model entries accept model options (``model``,
``pretrained``, ``pretrained_file``, ``freeze``, ``filters``, ``hidden``, ``dropout``,
``input_size``) and training overrides (``epochs``, ``batch_size``, ``lr``, ``lr_schedule``,
``patience``, ``val_fraction``, ``limit``, ``native_size``, ``augment``, ``precision``, ``adv_*``).
Top-level ``model_options`` apply to every timm-backed model (``timm:<name>``, ``resnet50``,
``convnext_small``) that does not set them itself. Relative paths (``data``, ``out``,
``pretrained_file``) are taken from the current directory.

Statistics over seeds (:mod:`fakescope.study.stats`): with several seeds, every figure becomes
``{"mean", "std", "ci95", "n", "values"}`` with a Student t-interval of the mean (and a ``note``
when n < 5); with one seed the figures are the plain numbers of the evaluate JSON.

Shortcut control (``jpeg_align: Q``): every run is evaluated a second time with every image of
both classes re-encoded as JPEG at quality Q (``shortcut.eval_aligned``: did the detector learn the
compression?). With ``jpeg_align_train: true`` aligned runs are trained as well (run directories
``<model>-jpegQ-seedS``) and evaluated aligned (``shortcut.train_aligned``).

Precision check (``precision_check: true``, the default): where the device supports bf16, the first
seed's run scores the val images in fp32 and in bf16 and the model's entry records
``precision_check: {"agreement", "max_abs_diff", "mean_abs_diff", "n"}``.

Rerunning a configuration reuses every finished run whose training configuration is unchanged and
every evaluation, attack and precision check whose key is unchanged (:mod:`fakescope.study.runs`);
``force: true`` recomputes everything.
"""

from fakescope.study.benchmark import CONFIG_FILE, run_benchmark
from fakescope.study.benchmark_report import RESULTS, write_benchmark_report
from fakescope.study.config import BenchmarkConfig, ModelSpec, load_config_file, make_config, normalise_model_options
from fakescope.study.cross import run_cross
from fakescope.study.stats import aggregate, summarize

__all__ = ["CONFIG_FILE", "RESULTS", "BenchmarkConfig", "ModelSpec", "aggregate", "load_config_file", "make_config",
           "normalise_model_options", "run_benchmark", "run_cross", "summarize", "write_benchmark_report"]
