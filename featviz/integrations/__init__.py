"""featviz's monitors inside the trainers people use.

* ``online``: the pieces any loop can call: ``OnlineKnn`` (DINO's weighted kNN on a held-out
  labelled split, ``featviz knn``'s rule) and ``frozen_batchnorm`` (measure a model in train mode
  without moving its BatchNorm statistics); with ``featviz.collapse.CollapseMonitor`` (collapse
  metrics, RankMe, LiDAR) they are the monitors of a plain loop;
* ``lightning``: ``FeatvizMonitor``, the same monitors as a Lightning callback (``lightning`` or
  ``pytorch_lightning``), writing the run's ``metrics.jsonl`` and the Trainer's own loggers.

Nothing here is imported by ``featviz --help``; Lightning is imported on first use of the callback.
"""
