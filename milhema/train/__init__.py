"""Training, inference and evaluation of patient-level MIL models (``milhema train``, ``cv``, ``predict``).

- :mod:`~milhema.train.data`: patient bags (all slides of a patient) and padded, masked batches;
- :mod:`~milhema.train.inputs`, :mod:`~milhema.train.model`: preprocessing fitted on the training
  patients, and the :class:`~milhema.train.model.PatientModel` that holds it with a MIL model;
- :mod:`~milhema.train.loop`: the training loop with early stopping;
- :mod:`~milhema.train.inference`: inference shared by train, predict and explain (predictions,
  per-patient and per-slide outputs, occlusion);
- :mod:`~milhema.train.metrics`: metrics with bootstrap CIs, and the faithfulness of cell scores;
- :mod:`~milhema.train.baseline`, :mod:`~milhema.train.survival`: scikit-learn baselines; survival
  heads, losses and concordance;
- :mod:`~milhema.train.run` (``run_train`` and the run-folder and tracker plumbing),
  :mod:`~milhema.train.cv` (``run_cv``), :mod:`~milhema.train.outputs`,
  :mod:`~milhema.train.checkpoint`, :mod:`~milhema.train.resume`: run folders;
- :mod:`~milhema.train.predict`: ``milhema predict``;
- :mod:`~milhema.train.distributed`: torchrun / DistributedDataParallel.

See docs/ARCHITECTURE.md.
"""
