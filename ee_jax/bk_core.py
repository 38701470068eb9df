"""The BK core: the diagonal of the resolvent of a tridiagonal matrix in O(N).

Let T be tridiagonal with diagonal ``a`` (N entries), super-diagonal ``b`` and
sub-diagonal ``c`` (N-1 entries each), and write M = T - zI, alpha_i = a_i - z,
k_i = b_i * c_i (the only way the off-diagonals enter the diagonal of M^-1).

* Forward pivots (LU of M without pivoting): d_0 = alpha_0,
  d_i = alpha_i - k_{i-1} / d_{i-1}. With theta_i the determinant of the leading
  (i+1)x(i+1) block of M, d_i = theta_i / theta_{i-1}.
* Backward pivots: dbar_{N-1} = alpha_{N-1}, dbar_i = alpha_i - k_i / dbar_{i+1}.
* Bidirectional diagonal: G_ii = [M^-1]_ii = 1 / (d_i + dbar_i - alpha_i).
* Causal diagonal: the resolvent of the leading block that ends at i,
  G_ii = [M[:i+1, :i+1]^-1]_ii = theta_{i-1} / theta_i = 1 / d_i. It depends only
  on positions <= i, so a next-token model built on it cannot see the future.
* Causal solve of value vectors u_i (ResNet-BK's resolvent applied to vectors, not
  only its diagonal): y_i = [M[:i+1, :i+1]^-1 u[:i+1]]_i. Forward elimination of
  the leading block gives w_i = u_i - (c_{i-1} / d_{i-1}) w_{i-1} and y_i = w_i / d_i
  (c_{i-1} = T[i, i-1]); with y_{i-1} = w_{i-1} / d_{i-1} that is the linear
  recurrence y_i = G_ii (u_i - c_{i-1} y_{i-1}): a data-dependent decay
  -c_{i-1} G_ii, so each system carries a vector of memory.

Shape legend: B... batch dimensions, N sequence positions.
"""

from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Method = Literal["auto", "associative", "sequential", "dense"]
METHODS: tuple[str, ...] = get_args(Method)

# A 2x2 complex matrix stored entry-wise: (m00, m01, m10, m11), each [..., N].
Matrix2 = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def resolvent_diagonal(
    diag: jax.Array,
    upper: jax.Array,
    lower: jax.Array,
    z: complex | jax.Array,
    *,
    causal: bool = False,
    method: Method = "associative",
    initial: jax.Array | None = None,
    link: tuple | None = None,
) -> jax.Array:
    """Diagonal of (T - zI)^-1 for tridiagonal T, or its causal counterpart.

    Args:
      diag: [..., N] real or complex diagonal of T.
      upper: [..., N-1] super-diagonal T[i, i+1] (broadcastable to that shape).
      lower: [..., N-1] sub-diagonal T[i+1, i] (broadcastable to that shape).
      z: complex scalar or array broadcastable to the batch shape diag.shape[:-1].
      causal: False gives [(T - zI)^-1]_ii, which depends on every position.
        True gives [(T[:i+1, :i+1] - zI)^-1]_ii, which depends on positions <= i.
      method: "associative" (O(N) work, O(log N) depth, lax.associative_scan),
        "sequential" (the same recurrences with lax.scan), "auto" (the faster
        of the two for the backend, see `resolve_method`) or "dense" (a
        jnp.linalg reference: O(N^3) bidirectional, O(N^4) causal; tests only).
      initial: causal only, [...] complex: the state before position 0, i.e. the
        last causal entry g_{-1} of a pass over the positions that precede these
        (zeros: none precede). The result is then the causal diagonal of the
        whole sequence (earlier and these positions) at these positions, so a
        long sequence can be processed in chunks (`continue_pivots`).
      link: with `initial`, (T[-1, 0], T[0, -1]): the off-diagonals joining the
        previous position to position 0, each broadcastable to [...].

    Returns:
      [..., N] complex array: complex64 for float32/complex64 inputs, complex128
      for float64/complex128 inputs (with x64 enabled).

    Numerics: for Hermitian T (real diag, upper = conj(lower)) and Im z > 0 the
    matrix T - zI restricted to any leading or trailing block is invertible
    (its numerical range lies in the lower half-plane), so no pivot d_i, dbar_i
    can vanish and every entry is finite. Otherwise a singular leading block
    (e.g. z an eigenvalue of a leading block of T with Im z = 0) makes the
    corresponding pivot zero and the entry inf or nan: that is the true value of
    the resolvent there, and it is returned rather than hidden.

    Raises:
      ValueError: naming the argument, for mismatched shapes, N = 0, a dtype that
        cannot be cast to complex, an unknown method, or `initial` without
        causal=True or without `link`.
    """
    dtype = _check_inputs(diag, upper, lower, z, method)
    alpha, coupling = _shifted_diagonal_and_coupling(diag, upper, lower, z, dtype)
    if initial is not None:
        if not causal:
            raise ValueError(
                "initial needs causal=True: a bidirectional entry reads later positions"
            )
        alpha = continue_pivots(alpha, initial, link)
    method = resolve_method(method)
    if method == "dense":
        return _dense_diagonal(alpha, coupling, causal)
    if method == "sequential":
        forward = _sequential_pivots(alpha, coupling, reverse=False)
        backward = None if causal else _sequential_pivots(alpha, coupling, reverse=True)
    else:
        forward = _associative_pivots(alpha, coupling, reverse=False)
        backward = None if causal else _associative_pivots(alpha, coupling, reverse=True)
    if causal:
        return 1.0 / forward
    return 1.0 / (forward + backward - alpha)


def causal_solve(
    diag: jax.Array,
    upper: jax.Array,
    lower: jax.Array,
    z: complex | jax.Array,
    values: jax.Array,
    *,
    method: Method = "associative",
    initial: tuple[jax.Array, jax.Array] | None = None,
    link: tuple | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Causal diagonal G_ii and causal solve y_i = [(T[:i+1, :i+1] - zI)^-1 u[:i+1]]_i.

    Args:
      diag, upper, lower, z: T and z as in `resolvent_diagonal`.
      values: [..., N, P] value vectors u_i (P per system).
      method: "associative", "sequential" or "auto" (as in `resolvent_diagonal`).
      initial: the state before position 0, (g_{-1} [...], y_{-1} [..., P]): the
        last G and y of a pass over the preceding positions (zeros: none). The
        outputs are then those of the whole sequence at these positions.
      link: with `initial`, (T[-1, 0], T[0, -1]) as in `resolvent_diagonal`.

    Returns:
      (G [..., N], y [..., N, P]), complex: G is `resolvent_diagonal(...,
      causal=True)`; y_i depends on positions <= i only. The state after the
      last position, to continue from, is (G[..., -1], y[..., -1, :]).

    The pivots are those of `resolvent_diagonal`; the solve is the linear
    recurrence y_i = a_i y_{i-1} + b_i with a_i = -T[i, i-1] G_ii and b_i = G_ii u_i
    (module docstring): a lax.scan ("sequential") or a lax.associative_scan over
    the affine maps y -> a y + b ("associative"). For Hermitian T and Im z > 0,
    |y_i| <= |u[:i+1]|_2 / Im z. Source: forward elimination (Thomas algorithm)
    of each leading block.

    Raises:
      ValueError: as `resolvent_diagonal`; values not of shape diag.shape + (P,);
        method "dense".
    """
    dtype = _check_inputs(diag, upper, lower, z, method)
    if method == "dense":
        raise ValueError("causal_solve has no dense method; tests use a numpy reference")
    if jnp.ndim(values) != jnp.ndim(diag) + 1 or jnp.shape(values)[:-1] != jnp.shape(diag):
        raise ValueError(
            f"values must have shape diag.shape + (P,) = {jnp.shape(diag)} + (P,), "
            f"got {jnp.shape(values)}"
        )
    method = resolve_method(method)
    alpha, coupling = _shifted_diagonal_and_coupling(diag, upper, lower, z, dtype)
    values = jnp.asarray(values).astype(dtype)
    if initial is not None:
        alpha = continue_pivots(alpha, initial[0], link)
        # y_0 = G_00 (u_0 - T[0, -1] y_{-1}): the previous value enters through u_0.
        previous = jnp.asarray(link[1]).astype(dtype)[..., None] * initial[1]  # [..., P]
        values = values.at[..., 0, :].add(-previous)
    pivots = _sequential_pivots if method == "sequential" else _associative_pivots
    green = 1.0 / pivots(alpha, coupling, reverse=False)  # [..., N]
    lower = jnp.asarray(lower).astype(dtype)
    lower = jnp.broadcast_to(lower, (*coupling.shape[:-1], coupling.shape[-1] - 1))
    decay = -jnp.pad(lower, [(0, 0)] * (lower.ndim - 1) + [(1, 0)]) * green  # [..., N]
    inputs = green[..., None] * values  # [..., N, P]
    if method == "sequential":

        def step(previous, xs):
            a, b = xs
            y = a[..., None] * previous + b
            return y, y

        init = jnp.zeros(inputs.shape[:-2] + inputs.shape[-1:], dtype)
        xs = (jnp.moveaxis(decay, -1, 0), jnp.moveaxis(inputs, -2, 0))
        _, solved = lax.scan(step, init, xs)
        return green, jnp.moveaxis(solved, 0, -2)

    def combine(earlier, later):  # affine maps y -> a y + b; `earlier` applies first
        return later[0] * earlier[0], later[0][..., None] * earlier[1] + later[1]

    _, solved = lax.associative_scan(combine, (decay, inputs), axis=decay.ndim - 1)
    return green, solved


def continue_pivots(alpha: jax.Array, initial: jax.Array, link) -> jax.Array:
    """alpha = diag - z [..., N] with the previous pass folded into position 0.

    The forward pivot of position 0 continuing a sequence is
    d_0 = alpha_0 - T[-1, 0] T[0, -1] g_{-1} (g_{-1} = 1 / d_{-1}, the last causal
    entry before it); with alpha_0 replaced by that value every later pivot of
    either scan is the whole sequence's (the recurrence reads d_0 only).

    Raises:
      ValueError: `link` is not a pair (T[-1, 0], T[0, -1]).
    """
    if link is None or len(link) != 2:
        raise ValueError(
            "link must be the pair (T[-1, 0], T[0, -1]) joining the previous position to "
            f"position 0 when an initial state is given, got {link!r}"
        )
    coupling = (jnp.asarray(link[0]) * jnp.asarray(link[1])).astype(alpha.dtype)
    return alpha.at[..., 0].add(-coupling * jnp.asarray(initial).astype(alpha.dtype))


def causal_solve_step(
    state: tuple[jax.Array, jax.Array],
    diag_i: jax.Array,
    lower: jax.Array,
    coupling: jax.Array,
    z: complex | jax.Array,
    values_i: jax.Array,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """One position of `causal_solve`, for decoding: state (g_{i-1} [...],
    y_{i-1} [..., P]), zeros before the first position -> ((g_i, y_i), same)."""
    g, y = state
    g, _ = causal_step(g, diag_i, coupling, z)
    y = g[..., None] * (values_i - lower * y)
    return (g, y), (g, y)


def resolve_method(method: Method, backend: str | None = None) -> str:
    """The explicit method "auto" stands for; other methods are returned unchanged.

    "auto" is "sequential" on CPU, where the scalar pivot recurrence (~15 flops
    a position) beats the associative scan's 2x2 products (~180 flops) and also
    compiles in a fraction of the time, and "associative" on GPU/TPU, where its
    O(log N) depth uses the parallel hardware (as recurrentgemma picks its scan
    by platform). Resolved in Python at trace time, from `backend` (default
    `jax.default_backend()`, the platform jit compiles for).
    """
    if method != "auto":
        return method
    backend = jax.default_backend() if backend is None else backend
    return "sequential" if backend == "cpu" else "associative"


def causal_step(
    state: jax.Array, diag_i: jax.Array, coupling: jax.Array, z: complex | jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One position of the causal core, for token-by-token decoding.

    The state is the previous causal diagonal entry g_{i-1} = 1 / d_{i-1}, the
    inverse of the previous pivot ratio; it starts at zero (see
    `causal_initial_state`), which makes position 0 need no special case.

    Args:
      state: [...] complex, g_{i-1} (zero before the first position).
      diag_i: [...] T_ii.
      coupling: [...] T[i-1, i] * T[i, i-1] (any value at position 0).
      z: complex scalar or array broadcastable to [...].

    Returns:
      (g_i, new_state): the causal entry [(T[:i+1, :i+1] - zI)^-1]_ii, twice.
    """
    g = 1.0 / (diag_i - z - coupling * state)
    return g, g


def causal_initial_state(batch_shape: tuple[int, ...], dtype=jnp.complex64) -> jax.Array:
    """The state of `causal_step` before position 0: g_{-1} = 0."""
    return jnp.zeros(batch_shape, dtype)


def _check_inputs(diag, upper, lower, z, method) -> jnp.dtype:
    """Validates shapes, dtypes and method; returns the complex result dtype."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("diag", diag), ("upper", upper), ("lower", lower), ("z", z)):
        dtype = np.dtype(getattr(value, "dtype", None) or np.result_type(value))
        if not (jnp.issubdtype(dtype, jnp.number) and dtype != jnp.bool_):
            raise ValueError(f"{name} must have a numeric dtype castable to complex, got {dtype}")
    if jnp.ndim(diag) == 0 or jnp.shape(diag)[-1] == 0:
        raise ValueError(f"diag must have shape (..., N) with N >= 1, got {jnp.shape(diag)}")
    batch_shape, n = jnp.shape(diag)[:-1], jnp.shape(diag)[-1]
    for name, value in (("upper", upper), ("lower", lower)):
        expected = (*batch_shape, n - 1)
        if not _broadcasts_to(jnp.shape(value), expected):
            raise ValueError(
                f"{name} must broadcast to (..., N-1) = {expected} for diag of shape "
                f"{jnp.shape(diag)}, got {jnp.shape(value)}"
            )
    if not _broadcasts_to(jnp.shape(z), batch_shape):
        raise ValueError(
            f"z must be a scalar or broadcastable to the batch shape {batch_shape}, "
            f"got {jnp.shape(z)}"
        )
    dtype = jnp.result_type(diag, upper, lower, z)
    return jnp.promote_types(dtype, jnp.complex64)


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(shape, target) == tuple(target)
    except ValueError:
        return False


def _shifted_diagonal_and_coupling(diag, upper, lower, z, dtype):
    """alpha = diag - z and k = upper * lower, both [..., N] and complex.

    The coupling is padded with a zero in front: k[..., i] couples position i to
    i-1, so k[..., 0] = 0 and the first pivot is alpha_0.
    """
    diag = jnp.asarray(diag).astype(dtype)
    z = jnp.asarray(z).astype(dtype)[..., None]  # [..., 1]
    alpha = diag - z  # [..., N]
    product = (jnp.asarray(upper) * jnp.asarray(lower)).astype(dtype)
    product = jnp.broadcast_to(product, (*diag.shape[:-1], diag.shape[-1] - 1))
    pad = [(0, 0)] * (diag.ndim - 1) + [(1, 0)]
    coupling = jnp.pad(product, pad)  # [..., N]
    return alpha, coupling


def _next_coupling(coupling: jax.Array) -> jax.Array:
    """k_i (coupling of i to i+1) at index i, for dbar_i = alpha_i - k_i / dbar_{i+1}."""
    return jnp.concatenate([coupling[..., 1:], jnp.zeros_like(coupling[..., :1])], -1)


def _sequential_pivots(alpha: jax.Array, coupling: jax.Array, *, reverse: bool) -> jax.Array:
    """Pivots d_i (or dbar_i with reverse=True) with lax.scan; [..., N]."""
    if reverse:
        coupling = _next_coupling(coupling)

    def step(inverse_pivot, inputs):
        alpha_i, coupling_i = inputs
        pivot = alpha_i - coupling_i * inverse_pivot
        return 1.0 / pivot, pivot

    init = jnp.zeros(alpha.shape[:-1], alpha.dtype)
    xs = (jnp.moveaxis(alpha, -1, 0), jnp.moveaxis(coupling, -1, 0))  # [N, ...]
    _, pivots = lax.scan(step, init, xs, reverse=reverse)
    return jnp.moveaxis(pivots, 0, -1)  # [..., N]


def _associative_pivots(alpha: jax.Array, coupling: jax.Array, *, reverse: bool) -> jax.Array:
    """Pivots d_i (or dbar_i with reverse=True) with lax.associative_scan; [..., N].

    The recurrence d_i = alpha_i - k_{i-1} / d_{i-1} is the Moebius map of the
    transfer matrix A_i = [[alpha_i, -k_{i-1}], [1, 0]] acting on
    (theta_{i-1}, theta_{i-2}): (theta_i, theta_{i-1}) = A_i (theta_{i-1},
    theta_{i-2}) with (theta_{-1}, theta_{-2}) = (1, 0). So
    P_i = A_i A_{i-1} ... A_0 holds (theta_i, theta_{i-1}) in its first column
    and d_i = P_i[0, 0] / P_i[1, 0]. The backward pivots use
    Q_i = A'_i A'_{i+1} ... A'_{N-1} with A'_i = [[alpha_i, -k_i], [1, 0]] and
    dbar_i = Q_i[0, 0] / Q_i[1, 0]; the same combine with reverse=True builds it.

    The determinants theta_i grow or shrink geometrically, so raw products
    overflow float32 within tens of positions. `_combine` therefore divides
    each product by a positive scalar. Matrix multiplication is bilinear, so
    scaling any factor scales the product by the same scalar:
    combine(combine(a, b), c) and combine(a, combine(b, c)) are both
    (c @ b @ a) / (positive scalar). The scan is thus associative on matrices up
    to a positive scalar (projectively), which is all the readout needs: the
    ratio P[0, 0] / P[1, 0] is invariant to any such scalar. For the same
    reason the scalar is held constant under differentiation (stop_gradient):
    the output does not depend on it, so its derivative contributes exactly 0.
    """
    if reverse:
        coupling = _next_coupling(coupling)
    ones = jnp.ones_like(alpha)
    # The scan never applies the combine to its first element (the last one with
    # reverse=True), so the inputs are normalised too.
    transfer = _normalise((alpha, -coupling, ones, jnp.zeros_like(alpha)))
    products = lax.associative_scan(_combine, transfer, reverse=reverse, axis=alpha.ndim - 1)
    return products[0] / products[2]


def _combine(earlier: Matrix2, later: Matrix2) -> Matrix2:
    """later @ earlier, rescaled; `earlier` is the product applied first."""
    a00, a01, a10, a11 = earlier
    b00, b01, b10, b11 = later
    product = (
        b00 * a00 + b01 * a10,
        b00 * a01 + b01 * a11,
        b10 * a00 + b11 * a10,
        b10 * a01 + b11 * a11,
    )
    return _normalise(product)


def _normalise(matrix: Matrix2) -> Matrix2:
    """Divides a 2x2 matrix by its largest real or imaginary component (> 0)."""
    parts = [jnp.abs(part) for entry in matrix for part in (entry.real, entry.imag)]
    scale = lax.stop_gradient(jnp.max(jnp.stack(parts), axis=0))
    return tuple(entry / scale for entry in matrix)


def _dense_diagonal(alpha: jax.Array, coupling: jax.Array, causal: bool) -> jax.Array:
    """Reference through one dense inverse G = (T - zI)^-1; [..., N].

    The dense matrix is rebuilt with symmetric off-diagonals s_i = sqrt(k_i): a
    diagonal similarity of T - zI with the same products b_i c_i, which keeps
    every principal minor, hence every diagonal entry of every principal
    inverse. Bidirectional: diag(G).

    Causal entry i is [(M')^-1]_ii for M' = M - Delta, where Delta removes the
    coupling s_i between i and i+1: M' is block diagonal, so its inverse holds
    the leading block's inverse. Delta lives on P = {i, i+1}, and
    X = (M - Delta)^-1 satisfies X = G + G Delta X, so
    X_PP = (I - G_PP Delta_PP)^-1 G_PP; with Delta_PP = [[0, s], [s, 0]] its
    (0, 0) entry is G_ii / ((1 - s G_i,i+1)(1 - s G_i+1,i) - s^2 G_ii G_i+1,i+1).
    Total cost: one O(N^3) inverse and O(N) for all causal entries.
    """
    n = alpha.shape[-1]
    off = jnp.sqrt(_next_coupling(coupling))  # [..., N], entry i couples i and i+1
    matrix = (
        alpha[..., :, None] * jnp.eye(n, dtype=alpha.dtype)
        + off[..., :, None] * jnp.eye(n, k=1, dtype=alpha.dtype)
        + off[..., None, :] * jnp.eye(n, k=-1, dtype=alpha.dtype)
    )  # [..., N, N]
    inverse = jnp.linalg.inv(matrix)  # [..., N, N]
    diagonal = jnp.diagonal(inverse, axis1=-2, axis2=-1)  # [..., N]
    if not causal:
        return diagonal
    s = off[..., :-1]  # [..., N-1]
    g_ii, g_jj = diagonal[..., :-1], diagonal[..., 1:]  # [..., N-1]
    g_ij = jnp.diagonal(inverse, offset=1, axis1=-2, axis2=-1)  # [..., N-1]
    g_ji = jnp.diagonal(inverse, offset=-1, axis1=-2, axis2=-1)  # [..., N-1]
    cut = g_ii / ((1 - s * g_ij) * (1 - s * g_ji) - s * s * g_ii * g_jj)  # [..., N-1]
    return jnp.concatenate([cut, diagonal[..., -1:]], axis=-1)
