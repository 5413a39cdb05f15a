"""FlashForge Triton kernels (installed as ``flashforge_hf.kernels``): one kernel family per module, each
with its launcher and a same-signature PyTorch reference."""
