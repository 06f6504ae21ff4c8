"""What the layers of megatron_emu agree on; depends on nothing else of ours."""
