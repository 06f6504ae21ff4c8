"""data_tools: preprocessing of real datasets into interleaved image-text WebDataset shards.

It imports no training or GPU code (only ``megatron_emu.data`` helpers)."""
