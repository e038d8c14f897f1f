"""Optional native kernels (built from source; the pure JAX paths never need them)."""
