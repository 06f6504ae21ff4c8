"""Generation from a megatron_emu checkpoint or a Hugging Face Emu2 directory."""
