"""The 2025 interactive protocol (box + 5 simulated clicks per class), torch-free (numpy + scipy).

Modules:

* :mod:`~harness.interactive.safe_npz`: 2025-format input files, read with a restricted unpickler;
* :mod:`~harness.interactive.clicks`: the evaluator's simulated user (one click per class per step);
* :mod:`~harness.interactive.scores`: per-step DSC/NSD, DSC_AUC/NSD_AUC, the 90 s-per-class cap;
* :mod:`~harness.interactive.convert`: 2024-format 3D cases to 2025 inputs (``harness convert``);
* :mod:`~harness.interactive.protocol`: the 6-step loop of one case around any step function;
* :mod:`~harness.interactive.run`: ``harness run --protocol interactive`` with the native runner;
* :mod:`~harness.interactive.external`: the same with ``--runner subprocess|docker`` / ``--image``, one
  fresh process or container per step;
* :mod:`~harness.interactive.baseline`: a box-fill-and-click-balls baseline step function;
* :mod:`~harness.interactive.cli`: ``harness convert`` and ``harness clicks``.

The protocol's public source is the repository JunMa11/CVPR-MedSegFMCompetition
(``CVPR25_iter_eval.py``, ``get_boxes.py``).
"""
