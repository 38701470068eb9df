"""The BK core against independent float64 references (numpy, not JAX)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TOLERANCE

from ee_jax import bk_core
from ee_jax.bk_core import causal_initial_state, causal_step, resolvent_diagonal

METHODS = ("associative", "sequential", "dense")


# ----------------------------------------------------------------- references


def reference_dense(diag, upper, lower, z, causal, positions=None):
    """float64 numpy: the definition, one dense inverse per requested entry.

    Bidirectional: diag(inv(T - zI)). Causal entry i: the (i, i) entry of the
    inverse of the leading (i+1)x(i+1) block (all positions, or `positions`).
    """
    n = diag.shape[-1]
    matrix = np.diag(diag.astype(np.complex128) - z) + np.diag(upper, 1) + np.diag(lower, -1)
    if not causal:
        return np.diag(np.linalg.inv(matrix))
    positions = range(n) if positions is None else positions
    return np.array([np.linalg.inv(matrix[: i + 1, : i + 1])[i, i] for i in positions])


def reference_recurrence(diag, upper, lower, z, causal):
    """float64 numpy: the pivot recurrences as an eager Python loop, [B, N]."""
    alpha = diag.astype(np.complex128) - np.asarray(z)[..., None]
    k = (upper * lower).astype(np.complex128)
    n = alpha.shape[-1]
    forward = np.empty_like(alpha)
    backward = np.empty_like(alpha)
    forward[..., 0] = alpha[..., 0]
    for i in range(1, n):
        forward[..., i] = alpha[..., i] - k[..., i - 1] / forward[..., i - 1]
    if causal:
        return 1.0 / forward
    backward[..., n - 1] = alpha[..., n - 1]
    for i in range(n - 2, -1, -1):
        backward[..., i] = alpha[..., i] - k[..., i] / backward[..., i + 1]
    return 1.0 / (forward + backward - alpha)


def max_relative_error(result, reference):
    return float(np.max(np.abs(np.asarray(result) - reference) / np.abs(reference)))


@functools.cache
def laplacian_system(n, seed=0):
    """Diagonal -2 + v, v ~ U[-3, 3]; off-diagonals 1; float64 numpy."""
    rng = np.random.default_rng(seed + n)
    return -2.0 + rng.uniform(-3, 3, n), np.ones(n - 1), np.ones(n - 1)


@functools.cache
def reference_for(n, causal):
    diag, upper, lower = laplacian_system(n)
    # Causal references above N = 128 use the exact definition at sampled positions.
    positions = None if n <= 128 or not causal else sorted({0, 1, n // 3, n // 2, n - 2, n - 1})
    return positions, reference_dense(diag, upper, lower, 1j, causal, positions)


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 128, 1000, 2048])
def test_matches_float64_dense_inverse(n, causal, method):
    # Given the seed's system: diagonal -2 + v, v ~ U[-3, 3], off-diagonals 1, z = i.
    diag, upper, lower = laplacian_system(n)
    positions, reference = reference_for(n, causal)
    # When the float32 core computes it.
    result = resolvent_diagonal(
        jnp.float32(diag),
        jnp.float32(upper),
        jnp.float32(lower),
        1j,
        causal=causal,
        method=method,
    )
    # Then it is complex64 and within float32 rounding of the float64 definition.
    assert result.dtype == jnp.complex64
    chex.assert_shape(result, (n,))
    result = np.asarray(result) if positions is None else np.asarray(result)[positions]
    assert max_relative_error(result, reference) <= TOLERANCE["float32"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", [False, True])
def test_complex_off_diagonals_and_several_z(causal, method):
    # Given random complex off-diagonals and a batch of z with Im z in [0.05, 5].
    rng = np.random.default_rng(1)
    batch, n = 4, 128
    diag = -2.0 + rng.uniform(-3, 3, (batch, n))
    upper = rng.normal(size=(batch, n - 1)) + 1j * rng.normal(size=(batch, n - 1))
    lower = rng.normal(size=(batch, n - 1)) + 1j * rng.normal(size=(batch, n - 1))
    z = np.array([0.3 + 0.05j, -1.0 + 0.5j, 0.0 + 1.0j, 2.0 + 5.0j])
    # When the complex64 core computes the whole batch at once.
    result = resolvent_diagonal(
        jnp.float32(diag),
        jnp.complex64(upper),
        jnp.complex64(lower),
        jnp.complex64(z),
        causal=causal,
        method=method,
    )
    # Then every row matches its own float64 dense reference.
    chex.assert_shape(result, (batch, n))
    for row in range(batch):
        reference = reference_dense(diag[row], upper[row], lower[row], z[row], causal)
        assert max_relative_error(result[row], reference) <= TOLERANCE["float32"]


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequence_with_large_potentials_is_finite_and_accurate(causal):
    # Given N = 65536 and potentials up to |v| = 1e4 (the original returns zeros here).
    rng = np.random.default_rng(2)
    n = 65536
    diag = -2.0 + rng.uniform(-1e4, 1e4, (2, n))
    diag[1, : n // 2] = -2.0 + rng.uniform(-3, 3, n // 2)  # mixed scales in one row
    ones = np.ones((2, n - 1))
    # When the float32 associative core computes it.
    result = np.asarray(
        resolvent_diagonal(
            jnp.float32(diag), jnp.float32(ones), jnp.float32(ones), 1j, causal=causal
        )
    )
    # Then it is finite and agrees with the float64 recurrence.
    assert np.all(np.isfinite(result))
    reference = reference_recurrence(diag, ones, ones, np.full(2, 1j), causal)
    assert max_relative_error(result, reference) <= TOLERANCE["long_sequence"]


def weighted_loss(result, weights):
    """A scalar loss that mixes real and imaginary parts of every entry."""
    return jnp.sum(weights[0] * result.real + weights[1] * result.imag)


def finite_difference_gradient(function, x, eps=1e-6):
    """Central differences in float64."""
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        gradient[index] = (function(x + step) - function(x - step)) / (2 * eps)
    return gradient


@pytest.mark.parametrize("method", ["associative", "sequential"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_finite_differences_and_dense(causal, method):
    # Given a small system, a random loss and float64 finite differences of the
    # numpy recurrence with respect to the diagonal and both off-diagonals.
    rng = np.random.default_rng(3)
    n = 17
    diag, upper, lower = (
        -2.0 + rng.uniform(-3, 3, n),
        rng.normal(size=n - 1),
        rng.normal(size=n - 1),
    )
    weights = rng.normal(size=(2, n))
    z = 0.4 + 0.8j

    def numpy_loss(d, u, lo):
        g = reference_recurrence(d, u, lo, z, causal)
        return np.sum(weights[0] * g.real + weights[1] * g.imag)

    expected = (
        finite_difference_gradient(lambda d: numpy_loss(d, upper, lower), diag),
        finite_difference_gradient(lambda u: numpy_loss(diag, u, lower), upper),
        finite_difference_gradient(lambda lo: numpy_loss(diag, upper, lo), lower),
    )

    # When JAX differentiates the float32 core and the dense method.
    def loss(d, u, lo, method):
        return weighted_loss(
            resolvent_diagonal(d, u, lo, z, causal=causal, method=method), jnp.float32(weights)
        )

    arguments = (jnp.float32(diag), jnp.float32(upper), jnp.float32(lower))
    gradients = jax.grad(loss, argnums=(0, 1, 2))(*arguments, method)
    dense_gradients = jax.grad(loss, argnums=(0, 1, 2))(*arguments, "dense")
    # Then all three agree.
    for gradient, dense_gradient, reference in zip(
        gradients, dense_gradients, expected, strict=True
    ):
        scale = np.max(np.abs(reference))
        assert np.max(np.abs(gradient - reference)) <= TOLERANCE["float32_grad"] * scale
        assert np.max(np.abs(gradient - dense_gradient)) <= TOLERANCE["float32_grad"] * scale


@pytest.mark.parametrize("method", ["associative", "sequential"])
def test_causal_entries_ignore_later_positions(method):
    # Given a system and the same system with diag[j] changed.
    diag, upper, lower = (jnp.float32(a) for a in laplacian_system(128))
    j = 77
    changed = diag.at[j].add(1.5)
    compute = functools.partial(resolvent_diagonal, upper=upper, lower=lower, z=1j, method=method)
    # When both are computed causally and bidirectionally.
    causal_before, causal_after = compute(diag, causal=True), compute(changed, causal=True)
    full_before, full_after = compute(diag, causal=False), compute(changed, causal=False)
    # Then causal entries before j are bit-for-bit equal while entry j moves;
    # bidirectional entries before j move too (checked on the nearest five: the
    # influence decays geometrically with the distance, below float32 rounding
    # a few tens of positions away).
    np.testing.assert_array_equal(causal_before[:j], causal_after[:j])
    assert causal_before[j] != causal_after[j]
    assert np.all(full_before[j - 5 : j] != full_after[j - 5 : j])


def test_causal_step_iterated_equals_causal_scan():
    # Given a batch of systems with random complex couplings.
    rng = np.random.default_rng(4)
    batch, n = 3, 64
    diag = jnp.float32(-2.0 + rng.uniform(-3, 3, (batch, n)))
    upper = jnp.complex64(rng.normal(size=(batch, n - 1)) + 0.3j)
    lower = jnp.complex64(rng.normal(size=(batch, n - 1)))
    z = jnp.complex64([1j, 0.5 + 0.2j, -1 + 2j])
    expected = resolvent_diagonal(diag, upper, lower, z, causal=True)
    # When the recurrent step runs one position at a time (coupling 0 before position 0).
    coupling = jnp.pad(upper * lower, ((0, 0), (1, 0)))
    state = causal_initial_state((batch,))
    outputs = []
    for i in range(n):
        g, state = causal_step(state, diag[:, i], coupling[:, i], z)
        outputs.append(g)
    # Then it equals the parallel causal core position by position.
    stepped = jnp.stack(outputs, axis=-1)
    assert max_relative_error(stepped, np.asarray(expected)) <= 1e-6


class TransformTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_vmap_agree_with_batched_call(self):
        diag, upper, lower = (jnp.float32(a) for a in laplacian_system(17))
        batch = jnp.stack([diag, diag + 0.5])
        compute = self.variant(
            functools.partial(resolvent_diagonal, upper=upper, lower=lower, z=1j, causal=True)
        )
        batched = compute(batch)
        mapped = jax.vmap(compute)(batch)
        np.testing.assert_allclose(mapped, batched, rtol=TOLERANCE["float32"])


def test_float64_inputs_give_complex128():
    diag, upper, lower = laplacian_system(17)
    with jax.enable_x64(True):
        result = resolvent_diagonal(jnp.float64(diag), jnp.float64(upper), jnp.float64(lower), 1j)
        assert result.dtype == jnp.complex128
        reference = reference_dense(diag, upper, lower, 1j, causal=False)
        assert max_relative_error(result, reference) <= 1e-12


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(diag=np.zeros((2, 5)), upper=np.zeros((2, 5)), lower=np.zeros((2, 4))), "upper"),
        (dict(diag=np.zeros((2, 5)), upper=np.zeros((2, 4)), lower=np.zeros((3, 4))), "lower"),
        (dict(diag=np.zeros((2, 0)), upper=np.zeros((2, 0)), lower=np.zeros((2, 0))), "diag"),
        (dict(diag=np.zeros(5, bool), upper=np.zeros(4), lower=np.zeros(4)), "diag"),
        (dict(diag=np.zeros(5), upper=np.zeros(4), lower=np.zeros(4), z=np.ones(3)), "z"),
        (dict(diag=np.zeros(5), upper=np.zeros(4), lower=np.zeros(4), method="lu"), "method"),
        (dict(diag=np.array(["a"] * 5), upper=np.zeros(4), lower=np.zeros(4)), "diag"),
    ],
)
def test_bad_input_names_the_argument(arguments, message):
    arguments = {"z": 1j, **arguments}
    with pytest.raises(ValueError, match=message):
        resolvent_diagonal(**arguments)


def test_methods_constant_lists_every_method():
    assert set(bk_core.METHODS) == {*METHODS, "auto"}


@pytest.mark.parametrize(
    "backend, expected", [("cpu", "sequential"), ("gpu", "associative"), ("tpu", "associative")]
)
def test_auto_resolves_by_backend_and_explicit_methods_pass_through(backend, expected):
    assert bk_core.resolve_method("auto", backend) == expected
    for method in METHODS:
        assert bk_core.resolve_method(method, backend) == method


@pytest.mark.parametrize("causal", [False, True])
def test_auto_equals_the_current_backends_method_and_the_reference(causal):
    # Given the seed's system, when "auto" and the backend's explicit method run.
    diag, upper, lower = laplacian_system(17)
    explicit = "sequential" if jax.default_backend() == "cpu" else "associative"
    compute = functools.partial(resolvent_diagonal, diag, upper, lower, 1j, causal=causal)
    auto = compute(method="auto")
    # Then they are the same computation, bit for bit, and match the float64 inverse.
    np.testing.assert_array_equal(auto, compute(method=explicit))
    reference = reference_dense(diag, upper, lower, 1j, causal)
    assert max_relative_error(auto, reference) <= TOLERANCE["float32"]


# ------------------------------------------------------- causal solve of values


def reference_causal_solve(diag, upper, lower, z, values):
    """float64 numpy: y_i = [(T[:i+1, :i+1] - zI)^-1 u[:i+1]]_i, one dense solve each."""
    n = diag.shape[-1]
    matrix = np.diag(diag.astype(np.complex128) - z) + np.diag(upper, 1) + np.diag(lower, -1)
    return np.stack(
        [np.linalg.solve(matrix[: i + 1, : i + 1], values[: i + 1])[i] for i in range(n)]
    )


@pytest.mark.parametrize("method", ["associative", "sequential"])
@pytest.mark.parametrize("n", [1, 2, 17, 128])
def test_causal_solve_matches_float64_dense_solves(n, method):
    # Given a Laplacian-plus-potential system with non-symmetric real off-diagonals,
    # several z and 3 value vectors per position.
    rng = np.random.default_rng(n)
    diag = -2.0 + rng.uniform(-3, 3, (2, n))
    upper, lower = rng.uniform(0.5, 1.5, (2, n - 1)), rng.uniform(0.5, 1.5, (2, n - 1))
    z = np.array([0.3 + 1j, -0.5 + 0.05j])
    values = rng.normal(size=(2, n, 3))
    green, solved = bk_core.causal_solve(
        jnp.asarray(diag, jnp.float32),
        jnp.asarray(upper, jnp.float32),
        jnp.asarray(lower, jnp.float32),
        jnp.asarray(z, jnp.complex64),
        jnp.asarray(values, jnp.float32),
        method=method,
    )
    for b in range(2):
        reference = reference_causal_solve(diag[b], upper[b], lower[b], z[b], values[b])
        scale = np.max(np.abs(reference))
        np.testing.assert_allclose(np.asarray(solved[b]), reference, atol=2e-5 * scale)
        np.testing.assert_allclose(
            np.asarray(green[b]),
            reference_dense(diag[b], upper[b], lower[b], z[b], True),
            rtol=2e-5,
        )


def test_causal_solve_in_float64_is_exact_and_its_step_agrees():
    # Given float64 inputs (x64 enabled locally): the scan equals the dense solves to
    # ~1e-12, and iterating causal_solve_step equals the scan.
    rng = np.random.default_rng(7)
    n = 40
    diag = -2.0 + rng.uniform(-3, 3, n)
    off = np.ones(n - 1)
    values = rng.normal(size=(n, 4))
    with jax.enable_x64(True):
        green, solved = bk_core.causal_solve(diag, off, off, 0.05j, values, method="sequential")
        reference = reference_causal_solve(diag, off, off, 0.05j, values)
        np.testing.assert_allclose(np.asarray(solved), reference, rtol=0, atol=1e-11)
        state = (jnp.zeros((), jnp.complex128), jnp.zeros(4, jnp.complex128))
        for i in range(n):
            state, (g, y) = bk_core.causal_solve_step(state, diag[i], 1.0, 1.0, 0.05j, values[i])
            np.testing.assert_allclose(np.asarray(y), np.asarray(solved[i]), atol=1e-12)
            np.testing.assert_allclose(complex(g), complex(green[i]), atol=1e-12)


def test_causal_solve_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    n = 9
    with jax.enable_x64(True):
        values = jnp.asarray(rng.normal(size=(n, 2)), jnp.float64)
        weights = jnp.asarray(rng.normal(size=(n, 2)), jnp.float64)

        def loss(potential, values):
            _, y = bk_core.causal_solve(
                -2.0 + potential, 1.0, 1.0, 0.3j, values, method="associative"
            )
            return jnp.sum(weights * jnp.abs(y) ** 2)

        potential = jnp.asarray(rng.uniform(-1, 1, n))
        grads = jax.grad(loss, argnums=(0, 1))(potential, values)
        eps = 1e-6
        d_potential = jnp.asarray(rng.normal(size=n))
        d_values = jnp.asarray(rng.normal(size=(n, 2)))
        for grad, arguments in (
            (grads[0], lambda t: (potential + t * d_potential, values)),
            (grads[1], lambda t: (potential, values + t * d_values)),
        ):
            direction = d_potential if grad.ndim == 1 else d_values
            numeric = (loss(*arguments(eps)) - loss(*arguments(-eps))) / (2 * eps)
            np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(numeric), rtol=1e-6)


def test_causal_solve_rejects_bad_values():
    with pytest.raises(ValueError, match="values must have shape"):
        bk_core.causal_solve(jnp.zeros(5), 1.0, 1.0, 1j, jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="no dense method"):
        bk_core.causal_solve(jnp.zeros(5), 1.0, 1.0, 1j, jnp.zeros((5, 2)), method="dense")
