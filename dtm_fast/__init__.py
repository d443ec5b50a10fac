"""dtm_fast: Disperse-Then-Merge instruction tuning and a streaming, bounded-memory model merger.

Importing the package does no work: every heavy module (torch, transformers) is imported by the
command that needs it.
"""

__version__ = "0.1.0"
