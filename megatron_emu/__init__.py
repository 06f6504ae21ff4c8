"""megatron_emu: pretraining Emu2-class generative multimodal models on megatron-core.

Importing the package is cheap: it imports neither torch.distributed state, Transformer
Engine, nor the C++ extension. Subpackages that drive megatron-core (``model``, ``parallel``,
``training``) import ``megatron_emu.compat`` first.
"""

__version__ = "0.1.0"
