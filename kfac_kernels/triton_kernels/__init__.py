"""Triton kernels. Imported only when a Triton backend runs: importing ``kfac_kernels`` never needs Triton."""
