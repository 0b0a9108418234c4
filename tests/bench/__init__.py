"""The benchmark scripts' CPU-runnable parts."""
