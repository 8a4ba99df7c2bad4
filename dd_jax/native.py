"""Stage 2, fast path - C++ convolution kernels for XLA:CPU, called through the XLA FFI.

XLA:CPU has no convolution kernel that suits LeNet's narrow layers (1 -> 6 -> 16 channels):
its native convolution and every matmul formulation waste most of their work. The kernels in
``_native/conv.cc`` convolve directly, with the images of a block of 16 or 32 as the SIMD axis
("blocked" layout (B, H, W, C, 16 or 32); `block_for` picks the width that pads a batch
least), and use XLA's intra-op thread pool. Under ``jax.vmap`` (e.g. over networks) one call
computes every vmapped item.

`available()` compiles the sources on first use with the machine's C++ compiler (``$CXX``,
else ``g++``) for this CPU (``-march=native``) into ``$DD_JAX_CACHE_DIR`` (default
``~/.cache/dd_jax``), keyed by the sources, the compiler, jaxlib and the CPU, and registers the
FFI targets for the CPU platform (the same library holds the inner loop's dense-head step,
``_native/dense.cc``: `dd_jax.dense_step`); without a compiler it is False and warns why. The models use
the kernels when `enabled()`: JAX's default backend is the CPU, ``DD_JAX_NATIVE`` is not 0 and
they are available; otherwise their pure-XLA convolutions (`dd_jax.conv.CONVS`).

`conv_layer` (convolution, optionally 2x2 max pooling, bias and relu, in one pass) is
differentiable to any order: its input gradient is a `conv` (flipped, transposed kernel), its
kernel gradient `conv_weight_grad`, whose own gradients are `conv`s. With pooling, the kernel
gradient unpools the pooling gradient itself, piecewise (`conv_weight_grad_pooled`), and the
backward pass keeps only the pooled gradient for its own derivative (`unpool` recomputes the rest).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dd_jax.errors import ConfigError

BLOCKS = (16, 32)  # images per block: the innermost axis of the blocked layout
NATIVE = Path(__file__).parent / "_native"
SOURCES = (NATIVE / "conv.cc", NATIVE / "dense.cc")  # and the header they share, NATIVE / "common.h"
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC"]
TARGETS = {"dd_jax_conv_forward": "DdJaxConvForward",
           "dd_jax_conv_pool_forward": "DdJaxConvPoolForward",
           "dd_jax_conv_weight_grad": "DdJaxConvWeightGrad",
           "dd_jax_conv_weight_grad_pooled": "DdJaxConvWeightGradPooled",
           "dd_jax_unpool": "DdJaxUnpool",
           "dd_jax_pool_gather": "DdJaxPoolGather",
           "dd_jax_dense_step": "DdJaxDenseStep",
           "dd_jax_dense_step_vjp": "DdJaxDenseStepVjp"}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> Path:
    """Compiles SOURCES (once per source, compiler, jaxlib and CPU) and returns the library."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [path.read_text() for path in sorted(NATIVE.glob("*.[ch]*"))]
    key = hashlib.sha256("\0".join(
        [*texts, " ".join(FLAGS), version, jaxlib.__version__, _cpu_flags()]
    ).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DD_JAX_CACHE_DIR") or Path.home() / ".cache" / "dd_jax")
    library = cache / f"dd_jax_conv_{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then an atomic rename: no half files
        built = Path(tmp) / library.name
        result = subprocess.run(
            [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", str(built)],
            capture_output=True, text=True,
        )
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library


def enabled() -> bool:
    """Whether models should use the kernels: JAX's default backend is the CPU, DD_JAX_NATIVE
    is not 0 and `available()`."""
    return (jax.default_backend() == "cpu" and os.environ.get("DD_JAX_NATIVE", "1") != "0"
            and available())


@functools.cache
def available() -> bool:
    """Builds (if needed), loads and registers the kernels, once per process; False, with a
    warning saying why, when they cannot be."""
    compiler = os.environ.get("CXX") or "g++"
    try:
        if not shutil.which(compiler):
            raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"dd_jax: the native CPU convolution kernels are unavailable ({e}); using the "
            "pure-XLA convolution instead (slower on CPU). Install g++ (or set CXX) to build "
            "them, or set DD_JAX_NATIVE=0 to choose the XLA path without this warning.",
            RuntimeWarning, stacklevel=2,
        )
        return False
    return True


def _flip(kernel: jax.Array) -> jax.Array:
    """(kh, kw, Ci, Co) -> (kh, kw, Co, Ci), rotated 180 degrees: the input gradient's kernel."""
    return jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)


def _output_hw(x: jax.Array, kernel: jax.Array, pads: tuple[int, int]) -> tuple[int, int]:
    """The convolution's output height and width (before pooling)."""
    return tuple(x.shape[1 + a] + 2 * pads[a] - kernel.shape[a] + 1 for a in (0, 1))


def _transposed(pads: tuple[int, int], kernel_hw: tuple[int, int]) -> tuple[int, int]:
    """The padding of the input gradient's convolution."""
    return kernel_hw[0] - 1 - pads[0], kernel_hw[1] - 1 - pads[1]


def ffi_call(target: str, results: list[tuple[tuple[int, ...], jnp.dtype]], *args: jax.Array,
             **attrs) -> list[jax.Array]:
    """Calls FFI `target` on `args` for results of the given (shape, dtype)s. Inside
    shard_map the results vary over the mesh axes that any argument varies over (the
    arguments are first made to vary over all of them)."""
    axes = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in args))
    args = [jax.lax.pcast(a, tuple(missing), to="varying")
            if (missing := axes - jax.typeof(a).manual_axis_type.varying) else a for a in args]
    manual = {}
    if axes:  # inside shard_map: the results typed as varying on its (manual) mesh
        template = jax.typeof(args[0])
        manual = dict(sharding=NamedSharding(template.sharding.mesh, P()),
                      manual_axis_type=template.manual_axis_type)
    out = [jax.ShapeDtypeStruct(shape, dtype, **manual) for shape, dtype in results]
    return jax.ffi.ffi_call(target, out, vmap_method="expand_dims")(*args, **attrs)


def like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """The cotangent summed over the mesh axes it varies over and `primal` does not: the
    transpose of `ffi_call`'s cast of its arguments to vary (no-op outside shard_map)."""
    extra = jax.typeof(cotangent).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _layer_call(x, kernel, bias, pads, pool, relu):
    """The FFI call: (y, argmax index) with `pool`, else (y, an empty int8 array)."""
    b, co, lanes = x.shape[0], kernel.shape[3], x.shape[4]
    ho, wo = _output_hw(x, kernel, pads)
    args = (x, kernel.astype(x.dtype), bias.astype(x.dtype))
    attrs = dict(padding_h=np.int64(pads[0]), padding_w=np.int64(pads[1]), relu=relu)
    if not pool:
        y, = ffi_call("dd_jax_conv_forward", [((b, ho, wo, co, lanes), x.dtype)], *args, **attrs)
        return y, jnp.zeros((0,), jnp.int8)
    shape = (b, ho // 2, wo // 2, co, lanes)
    y, index = ffi_call("dd_jax_conv_pool_forward", [(shape, x.dtype), (shape, jnp.int8)], *args, **attrs)
    return y, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _layer(x, kernel, bias, pads, pool, relu):
    return _layer_call(x, kernel, bias, pads, pool, relu)


def _layer_fwd(x, kernel, bias, pads, pool, relu):
    y, index = _layer(x, kernel, bias, pads, pool, relu)  # itself: differentiable again
    return (y, index), (x, kernel, bias, y, index)


def _layer_bwd(pads, pool, relu, residuals, cotangents):
    x, kernel, bias, y, index = residuals
    if pool:
        dx, dkernel, dbias = _pooled_grads(cotangents[0], x, kernel, y, index, pads, relu)
    else:
        g = jnp.where(y > 0, cotangents[0], 0) if relu else cotangents[0]
        dx, dkernel, dbias = _unpooled_grads(g, x, kernel, pads)
    return like_primal(dx, x), like_primal(dkernel, kernel), like_primal(dbias, bias)


_layer.defvjp(_layer_fwd, _layer_bwd)


def _unpooled_grads(dy, x, kernel, pads):
    """The gradients of ``sum(dy * (conv(x, kernel, pads) + bias))`` w.r.t. x, the kernel and
    the bias, from the gradient dy (B, Ho, Wo, Co, NB) at the (unpooled) convolution output."""
    kernel_hw = kernel.shape[:2]
    return (conv(dy, _flip(kernel), _transposed(pads, kernel_hw)),
            conv_weight_grad(x, dy, pads, kernel_hw), dy.sum((0, 1, 2, 4)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _pooled_grads(g, x, kernel, y, index, pads, relu):
    """`_unpooled_grads` of a pooled layer, from the gradient g (B, Ho/2, Wo/2, Co, NB) at its
    pooled output y: dy = unpool(g, y, index, relu). The kernel and bias gradients come from g
    in one kernel call, which unpools dy piecewise (so where the input gradient is not
    needed, as for the first layer, dy is never written out whole); the VJP recomputes dy from
    g rather than keeping it: a loop of steps then stores the pooled g, not the 4x larger dy
    (y and index get no gradient, as in `unpool`)."""
    kernel_hw = kernel.shape[:2]
    dkernel, dbias = conv_weight_grad_pooled(x, g, y, index, pads, kernel_hw, relu)
    dx = conv(unpool(g, y, index, relu), _flip(kernel), _transposed(pads, kernel_hw))
    return dx, dkernel, dbias


def _pooled_grads_fwd(g, x, kernel, y, index, pads, relu):
    g, x, kernel, y, index = (a.value for a in (g, x, kernel, y, index))
    return _pooled_grads(g, x, kernel, y, index, pads, relu), (g, x, kernel, y, index)


def _pooled_grads_bwd(pads, relu, residuals, cotangents):
    g, x, kernel, y, index = residuals
    # an output that nothing differentiates (the first layer's input gradient, in a training
    # step) has a symbolic zero cotangent: its transpose is left out, not run on zeros
    used = [not isinstance(c, jax.custom_derivatives.SymbolicZero) for c in cotangents]

    def grads(g, x, kernel):
        dx, dkernel, _ = _unpooled_grads(unpool(g, y, index, relu), x, kernel, pads)
        # the bias gradient as the masked pooled g's sum (the same value): its transpose then
        # stays at the pooled size
        dbias = (jnp.where(y > 0, g, 0) if relu else g).sum((0, 1, 2, 4))
        return [o for o, u in zip((dx, dkernel, dbias), used) if u]

    _, vjp = jax.vjp(grads, g, x, kernel)
    return (*vjp([c for c, u in zip(cotangents, used) if u]), None, None)


_pooled_grads.defvjp(_pooled_grads_fwd, _pooled_grads_bwd, symbolic_zeros=True)


def conv_layer(x: jax.Array, kernel: jax.Array, bias: jax.Array, padding: int | tuple[int, int] = 0,
               pool: bool = False, relu: bool = False) -> jax.Array:
    """A convolution layer in the blocked layout (`to_blocked`), in one pass: stride-1 convolution
    (cross-correlation; zero padding of `padding` rows and columns, or (rows, columns), on
    each side, less than the kernel's size), with `pool` 2x2 max pooling (stride 2; an even
    output needed), + bias, with `relu` rectified.
    x (B, H, W, Ci, NB), kernel (kh, kw, Ci, Co), bias (Co,) -> (B, Ho, Wo, Co, NB),
    Ho = H + 2 padding - kh + 1 (halved with pool). Differentiable to any order; the pooling
    gradient goes to the first maximum of each window in row-major order (PyTorch's)."""
    pads = (padding, padding) if isinstance(padding, int) else tuple(padding)
    _check(x, kernel, pads, pool)
    return _layer(x, kernel, bias, pads, pool, relu)[0]


def _check(x: jax.Array, kernel: jax.Array, pads: tuple[int, int], pool: bool) -> None:
    """ConfigError for what the kernels cannot compute (they would refuse it at run time)."""
    kh, kw, cin, _ = kernel.shape
    if x.ndim != 5 or x.shape[4] not in BLOCKS:
        raise ConfigError(f"native.conv_layer takes images in the blocked layout (B, H, W, C, "
                          f"16 or 32) (native.to_blocked), got shape {x.shape}")
    if cin != x.shape[3]:
        raise ConfigError(f"the kernel has {cin} input channels, the images {x.shape[3]}")
    if not (0 <= pads[0] < kh and 0 <= pads[1] < kw):
        raise ConfigError(f"padding {pads} with a {kh}x{kw} kernel: the native convolution pads "
                          f"less than the kernel's size; use conv='toeplitz' for more")
    ho, wo = _output_hw(x, kernel, pads)
    if pool and (ho % 2 or wo % 2):
        raise ConfigError(f"2x2 pooling needs an even convolution output, got {ho}x{wo}")
    if x.dtype not in (jnp.float32, jnp.float64):
        raise ConfigError(f"the native convolution computes in float32 or float64, got {x.dtype}")


def conv(x: jax.Array, kernel: jax.Array, padding: int | tuple[int, int]) -> jax.Array:
    """`conv_layer` without bias, pooling or relu."""
    return conv_layer(x, kernel, jnp.zeros(kernel.shape[3], x.dtype), padding)


def _weight_grad_call(x, dy, pads, kernel_hw):
    dw, = ffi_call("dd_jax_conv_weight_grad", [((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)],
               x, dy, padding_h=np.int64(pads[0]), padding_w=np.int64(pads[1]))
    return dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_weight_grad(x: jax.Array, dy: jax.Array, pads: tuple[int, int],
                     kernel_hw: tuple[int, int]) -> jax.Array:
    """The gradient of ``sum(dy * conv(x, kernel, pads))`` w.r.t. the kernel:
    x (B, H, W, Ci, NB), dy (B, Ho, Wo, Co, NB) -> (kh, kw, Ci, Co)."""
    return _weight_grad_call(x, dy, pads, kernel_hw)


def _weight_grad_fwd(x, dy, pads, kernel_hw):
    return conv_weight_grad(x, dy, pads, kernel_hw), (x, dy)


def _weight_grad_bwd(pads, kernel_hw, residuals, g):
    x, dy = residuals
    return (like_primal(conv(dy, _flip(g), _transposed(pads, kernel_hw)), x),
            like_primal(conv(x, g, pads), dy))


conv_weight_grad.defvjp(_weight_grad_fwd, _weight_grad_bwd)


def conv_weight_grad_pooled(x: jax.Array, g: jax.Array, y: jax.Array, index: jax.Array,
                            pads: tuple[int, int], kernel_hw: tuple[int, int],
                            relu: bool) -> tuple[jax.Array, jax.Array]:
    """The kernel and bias gradients of a pooled layer from the gradient g at its pooled
    output y: ``conv_weight_grad(x, dy, pads, kernel_hw)`` and ``dy.sum((0, 1, 2, 4))`` with
    dy = unpool(g, y, index, relu), the kernel unpooling dy a block of images at a time (with
    one input channel, two rows at a time).
    x (B, H, W, Ci, NB), g, y and index (B, Ho/2, Wo/2, Co, NB) -> (kh, kw, Ci, Co), (Co,).
    Not differentiable itself: `conv_layer`'s backward pass differentiates the unfused form."""
    co = g.shape[3]
    dw, db = ffi_call("dd_jax_conv_weight_grad_pooled",
                  [((*kernel_hw, x.shape[3], co), x.dtype), ((co,), x.dtype)], x, g, y, index,
                  padding_h=np.int64(pads[0]), padding_w=np.int64(pads[1]), relu=relu)
    return dw, db


def unpool(g: jax.Array, y: jax.Array, index: jax.Array, relu: bool) -> jax.Array:
    """The gradient of 2x2 max pooling, followed with `relu` by rectification, at its pooled
    output y: (B, H, W, C, NB) -> (B, 2H, 2W, C, NB), g[b, i, j] (0 where relu and y <= 0)
    placed at position index (0 .. 3, row-major) of its 2x2 window, zeros elsewhere. Linear in
    g; its transpose is `pool_gather` (y and index get no gradient)."""
    return _pool_grad(g, y, index, relu, False)


def pool_gather(dy: jax.Array, y: jax.Array, index: jax.Array, relu: bool) -> jax.Array:
    """The transpose of `unpool`: (B, 2H, 2W, C, NB) -> (B, H, W, C, NB), dy at position index
    of each 2x2 window (0 where relu and y <= 0)."""
    return _pool_grad(dy, y, index, relu, True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pool_grad(a, y, index, relu, gather):
    """`pool_gather` of a with `gather`, else `unpool` of a: each one's VJP is the other."""
    if gather:
        out, = ffi_call("dd_jax_pool_gather", [(y.shape, a.dtype)], a, y, index, relu=relu)
    else:
        out, = ffi_call("dd_jax_unpool", [(_unpooled(a.shape), a.dtype)], a, y, index, relu=relu)
    return out


def _pool_grad_fwd(a, y, index, relu, gather):
    return _pool_grad(a, y, index, relu, gather), (a, y, index)


def _pool_grad_bwd(relu, gather, residuals, ct):
    a, y, index = residuals
    return like_primal(_pool_grad(ct, y, index, relu, not gather), a), None, None


_pool_grad.defvjp(_pool_grad_fwd, _pool_grad_bwd)


def _unpooled(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(B, H, W, C, NB) -> (B, 2H, 2W, C, NB)."""
    b, h, w, c, lanes = shape
    return b, 2 * h, 2 * w, c, lanes


def block_for(n: int) -> int:
    """The block width for a batch of n images: 16 where a block of 32 would pad it by more
    (n = 10 -> 16, n = 20 or 1024 -> 32)."""
    return 16 if 0 < n % 32 <= 16 else 32


def to_blocked(x: jax.Array, block: int | None = None) -> jax.Array:
    """(N, H, W, C) -> (ceil(N/NB), H, W, C, NB), the batch zero-padded to whole blocks of
    NB = `block` images (default `block_for(N)`)."""
    n = x.shape[0]
    block = block or block_for(n)
    x = jnp.pad(x, ((0, -n % block),) + ((0, 0),) * (x.ndim - 1))
    return x.reshape(-1, block, *x.shape[1:]).transpose(0, 2, 3, 4, 1)


def from_blocked(y: jax.Array, n: int) -> jax.Array:
    """(B, H, W, C, NB) -> (n, H, W, C): the first n images."""
    b, h, w, c, block = y.shape
    return y.transpose(0, 4, 1, 2, 3).reshape(b * block, h, w, c)[:n]
