"""Preloaded by the multiprocessing forkserver that :func:`segcompress.corrupt.generate` starts.

Importing it compiles glass_blur's numba kernel in the server, so every pool worker forked from
the server starts with the kernel compiled (the pool initializer's warm-up is then a no-op).
"""

from segcompress.corrupt import warm_up

warm_up()
