"""Python wrappers of the C kernels: one module per csrc/kernels/*.c file."""
