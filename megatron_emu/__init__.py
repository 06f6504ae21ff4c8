"""megatron_emu: pretraining Emu2-class generative multimodal models on megatron-core.

Importing the package (or any of its modules) changes nothing global: no torch or megatron-core
patch, no warning filter. Entry points prepare the process with
``megatron_emu.compat.setup_process()`` before they import megatron-core (on a machine without
CUDA it enables the CPU layer). Layers and where things go: ``docs/architecture.md``.
"""

__version__ = "0.1.0"
