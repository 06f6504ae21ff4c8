"""What a training job prints: our lines, and the libraries' notices only when they matter.

Rank 0 logs at INFO, the other ranks at WARNING. megatron-core's and torch's known deprecation
and fallback notices (FutureWarnings of torch DCP's ShardedTensor and ``load_state_dict``,
"Transformer Engine and Apex are not installed", ...) are said once, in our words, by rank 0;
``--verbose`` (``setup(rank, verbose=True)``) shows everything as the libraries print it.
"""

from __future__ import annotations

import logging
import re
import warnings

# Known notices: (category, message pattern) -> what to say once instead (None: say nothing).
KNOWN = [
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     "torch DCP deprecation notices about ShardedTensor / load_state_dict are hidden "
     "(megatron-core's checkpoint format uses them; --verbose shows them)"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed", None),
    (UserWarning, r"Transformer Engine and Apex are not installed", None),
    (UserWarning, r"TypedStorage is deprecated", None),
]


class _Notices:
    def __init__(self, rank: int):
        self.rank, self.said = rank, set()
        self.log = logging.getLogger("megatron_emu.train")

    def showwarning(self, message, category, filename, lineno, file=None, line=None):
        text = str(message)
        for i, (cat, pattern, ours) in enumerate(KNOWN):
            if issubclass(category, cat) and re.search(pattern, text):
                if ours and i not in self.said and self.rank == 0:
                    self.log.info(ours)
                self.said.add(i)
                return
        key = (category, text)
        if key in self.said:
            return  # any other warning: once per process
        self.said.add(key)
        logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def setup(rank: int, verbose: bool = False) -> None:
    """Log format and levels for this rank; library notices once, in our words, unless verbose."""
    level = logging.INFO if rank == 0 or verbose else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron_emu").setLevel(level)
    if verbose:
        return
    for noisy in ("megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR if rank else logging.WARNING)
    warnings.showwarning = _Notices(rank).showwarning
