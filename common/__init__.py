"""What every platform folder shares (``pipelines/``, ``training/``, ``serving/`` import it; it
imports none of them)."""
