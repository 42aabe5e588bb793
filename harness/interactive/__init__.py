"""The 2025 interactive protocol (box + 5 simulated clicks per class), torch-free (numpy + scipy).

Modules: :mod:`~harness.interactive.safe_npz` (2025-format inputs, restricted unpickler).
"""
