"""Layer-streamed, exact per-sample gradient statistics (see streaming.py for the sweep)."""
