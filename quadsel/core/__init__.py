"""What every quadsel package shares and none owns: atomic writes and hashing (:mod:`.atomic`),
the one progress display (:mod:`.progress`), fault injection for the crash tests (:mod:`.faults`)
and the user-facing error types (:mod:`.errors`). It imports nothing else of quadsel, so
``pipeline``, ``influence``, ``selection`` and ``jobs`` can all depend on it."""
