"""evomerge: search for recipes that merge fine-tuned language models."""

import os

# Large CPU tensors allocate several times faster on transparent huge pages; merges allocate
# many. Read by torch's CPU allocator when it starts, so set before torch is imported (an
# explicit THP_MEM_ALLOC_ENABLE=0 in the environment wins).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
