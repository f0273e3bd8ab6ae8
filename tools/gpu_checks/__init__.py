"""The sections of the prepared GPU check, one module each (``tools/gpu_check.py`` is the command line): rl (1),
rollout (2), mfu (3), memory (4), te (5), graph (6); the table, the section guard and shared helpers in common."""
