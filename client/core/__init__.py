"""The shared core: what the hook and the server both run.

``stethoscope.core.wire`` is the wire format (names, limits, how non-finite values travel) and
``stethoscope.core.detectors`` the detectors (pure Python, so a job can run them offline and
the server runs the same code on ingest). The core imports the standard library only: no
torch, and nothing of the hook's sender, spool or transport (``tests/test_packaging.py``).
"""
