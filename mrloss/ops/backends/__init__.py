"""Backend row ops of the chunk driver: ``torch`` (plain PyTorch) and ``triton`` (one kernel per file)."""
