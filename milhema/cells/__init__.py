"""Cell-level learning on the frozen features of the bags (``milhema cells train|predict``).

:mod:`~milhema.cells.annotations` gathers the annotated cells of a cohort's bags (their
``cell_types``, through the config's type list and merge map, and their anomaly attributes);
:mod:`~milhema.cells.model` is the classifier (a linear probe or a small MLP, with an optional
multi-label anomaly head) and its files; :mod:`~milhema.cells.losses` the class-balanced and the
asymmetric losses; :mod:`~milhema.cells.fit` trains one model with early stopping and calibrates
it on a patient-grouped validation split; :mod:`~milhema.cells.metrics` scores held-out
patients; :mod:`~milhema.cells.run` is ``cells train`` (patient-grouped cross-validation into an
atomic run folder), :mod:`~milhema.cells.predict` is ``cells predict`` (probabilities into the
bags, format version 2) and :mod:`~milhema.cells.active` is ``cells propose`` (which unannotated
cells to annotate next; the filled sheet returns through ``cells train --labels``).
"""
