"""Shared test set-up: compilation cache, matmul precision, tolerances."""

import jax

import ee_jax

ee_jax.enable_compilation_cache()
jax.config.update("jax_default_matmul_precision", "highest")

# One tolerance table for the suite (relative unless the name says otherwise).
TOLERANCE = {
    "float32": 1e-5,  # complex64 / float32 results against float64 references
    "float32_grad": 1e-4,  # float32 autodiff against float64 finite differences
    "long_sequence": 1e-4,  # N = 65536 against a float64 recurrence
    "bfloat16": 3e-2,
}
