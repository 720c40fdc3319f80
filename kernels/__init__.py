"""bigtrain fused-attention kernels (Triton)."""
