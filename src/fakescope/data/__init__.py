"""Data roots and images: layout and cached index (:mod:`.layout`), the safe reader (:mod:`.io`),
per-image transforms (:mod:`.transforms`), datasets and loaders (:mod:`.dataset`), ``data inspect``
(:mod:`.inspect`) and the demo dataset (:mod:`.demo`). Import the submodules directly."""
