// Direct 2-D convolution kernels for XLA:CPU, called through the XLA FFI (dd_jax/native.py).
//
// Layout "blocked": an image batch is (B, H, W, C, NB): NB = 32 images per block, the block's
// images innermost. Every multiply-add then works on whole SIMD registers whatever the channel
// counts are (LeNet's 1 -> 6 -> 16 channels leave matmuls on channels far too narrow).
// Kernels are HWIO (kh, kw, Ci, Co); stride 1, zero padding ph rows and pw columns on each side.
//   DdJaxConvForward:     y[b, i, j, co, :] =
//                           act(bias[co] + sum_{di, dj, ci} w[di, dj, ci, co] x[b, i+di-ph, j+dj-pw, ci, :])
//   DdJaxConvPoolForward: the same with 2x2 max pooling before the bias, and the argmax (int8)
//   DdJaxConvWeightGrad:  dw[di, dj, ci, co] =
//                           sum_{b, i, j, lanes} x[b, i+di-ph, j+dj-pw, ci, :] dy[b, i, j, co, :]
// act is relu or the identity. The input gradient is DdJaxConvForward of dy with the flipped,
// transposed kernel and padding (kh-1-ph, kw-1-pw) (native.py): with the weight gradient, the
// convolution is closed under differentiation. float32 and float64; the blocks are split over
// XLA's intra-op thread pool, and the result does not depend on which thread does what.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <optional>
#include <type_traits>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // NB: images per block, the innermost axis

template <typename T>
struct Reg;  // one 512-bit register of T (GCC splits it on narrower machines), its comparison
             // masks and its lanes as bytes
template <>
struct Reg<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t mask __attribute__((vector_size(64)));
  typedef int8_t bytes __attribute__((vector_size(16)));
};
template <>
struct Reg<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t mask __attribute__((vector_size(64)));
  typedef int8_t bytes __attribute__((vector_size(8)));
};
template <typename T>
using Vec = typename Reg<T>::type;
template <typename T>
using Mask = typename Reg<T>::mask;
template <typename T>
constexpr int kLanes = 64 / sizeof(T);
template <typename T>
constexpr int kRegsPerBlock = kBlock / kLanes<T>;

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, const Vec<T>& v) { std::memcpy(p, &v, sizeof v); }

// Calls f(std::integral_constant<int, n>{}) for a run-time 1 <= n <= N: the register tiles'
// sizes are template parameters, so that their accumulators stay in registers.
template <int N, typename F>
inline void with_static(int64_t n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_static<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// Runs f(0) .. f(n-1) on the calling thread and the pool's threads. Items are claimed from a
// shared counter, so the caller finishes the work alone if the pool is busy (no deadlock when
// the caller is itself a pool thread); late helpers find nothing left and touch nothing.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, f]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      f(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Shape {
  int64_t B, H, W, Ci, Co, kh, kw, ph, pw, Ho, Wo;
};

// acc = the convolution at output pixel (i, j) of one block, output channels co0 .. co0+CB-1:
// CB x kRegsPerBlock accumulators in registers; each loaded input register feeds CB
// multiply-adds.
template <typename T, int CB>
inline void accumulate_pixel(const Shape& s, const T* xb, const T* w, int64_t i, int64_t j,
                             int64_t co0, Vec<T> (&acc)[CB][kRegsPerBlock<T>]) {
  constexpr int R = kRegsPerBlock<T>;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = Vec<T>{};
  const int64_t di0 = std::max<int64_t>(0, s.ph - i), di1 = std::min(s.kh, s.H + s.ph - i);
  const int64_t dj0 = std::max<int64_t>(0, s.pw - j), dj1 = std::min(s.kw, s.W + s.pw - j);
  for (int64_t di = di0; di < di1; ++di)
    for (int64_t dj = dj0; dj < dj1; ++dj) {
      const T* xp = xb + ((i + di - s.ph) * s.W + (j + dj - s.pw)) * s.Ci * kBlock;
      const T* wp = w + (di * s.kw + dj) * s.Ci * s.Co + co0;
      for (int64_t ci = 0; ci < s.Ci; ++ci) {
        Vec<T> xv[R];
        for (int r = 0; r < R; ++r) xv[r] = load(xp + ci * kBlock + r * kLanes<T>);
        for (int c = 0; c < CB; ++c) {
          const T wv = wp[ci * s.Co + c];
          for (int r = 0; r < R; ++r) acc[c][r] += wv * xv[r];
        }
      }
    }
}

// v + bias, rectified with `relu`.
template <typename T>
inline Vec<T> finish(Vec<T> v, T bias, bool relu) {
  v += bias;
  return relu ? (v > 0 ? v : Vec<T>{}) : v;
}

// One output pixel (i, j): y[b, i, j, co0 .. co0+CB-1, :].
template <typename T, int CB>
inline void forward_pixel(const Shape& s, const T* xb, const T* w, const T* bias, bool relu,
                          T* y, int64_t i, int64_t j, int64_t co0) {
  constexpr int R = kRegsPerBlock<T>;
  Vec<T> acc[CB][R];
  accumulate_pixel<T, CB>(s, xb, w, i, j, co0, acc);
  T* out = y + ((i * s.Wo + j) * s.Co + co0) * kBlock;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r)
      store(out + c * kBlock + r * kLanes<T>, finish(acc[c][r], bias[co0 + c], relu));
}

// One pooled pixel (i, j) of 2x2 max pooling: the max of output pixels (2i+u, 2j+v) and which
// one, k = 2u + v, the first in that order on ties (as PyTorch's MaxPool2d); bias and relu
// after the max (the same as before it).
template <typename T, int CB>
inline void forward_pool_pixel(const Shape& s, const T* xb, const T* w, const T* bias, bool relu,
                               T* y, int8_t* index, int64_t i, int64_t j, int64_t co0) {
  constexpr int R = kRegsPerBlock<T>;
  Vec<T> best[CB][R], acc[CB][R];
  Mask<T> which[CB][R];
  for (int k = 0; k < 4; ++k) {
    accumulate_pixel<T, CB>(s, xb, w, 2 * i + k / 2, 2 * j + k % 2, co0, acc);
    for (int c = 0; c < CB; ++c)
      for (int r = 0; r < R; ++r) {
        if (k == 0) {
          best[c][r] = acc[c][r];
          which[c][r] = Mask<T>{};
        } else {
          const Mask<T> more = acc[c][r] > best[c][r];
          best[c][r] = more ? acc[c][r] : best[c][r];
          which[c][r] = more ? Mask<T>{} + k : which[c][r];
        }
      }
  }
  const int64_t at = ((i * (s.Wo / 2) + j) * s.Co + co0) * kBlock;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) {
      store(y + at + c * kBlock + r * kLanes<T>, finish(best[c][r], bias[co0 + c], relu));
      const auto k = __builtin_convertvector(which[c][r], typename Reg<T>::bytes);
      std::memcpy(index + at + c * kBlock + r * kLanes<T>, &k, sizeof k);
    }
}

// y = the convolution of x with w, or with `max_pool` its 2x2 max pooling and the argmax
// `index`; then + bias, and with `relu` rectified.
template <typename T>
void conv_forward(ffi::ThreadPool& pool, const Shape& s, const T* x, const T* w, const T* bias,
                  bool relu, T* y, int8_t* index, bool max_pool) {
  const int64_t rows = max_pool ? s.Ho / 2 : s.Ho, cols = max_pool ? s.Wo / 2 : s.Wo;
  const int64_t kMaxCB = max_pool ? 4 : 8;  // accumulators, maxima and argmaxes in registers
  parallel_for(pool, s.B * rows, [=](int64_t item) {
    const int64_t b = item / rows, i = item % rows;
    const T* xb = x + b * s.H * s.W * s.Ci * kBlock;
    const int64_t out = b * rows * cols * s.Co * kBlock;
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t co0 = 0; co0 < s.Co; co0 += kMaxCB) {
        with_static<8>(std::min(kMaxCB, s.Co - co0), [&](auto cb) {
          if (max_pool)
            forward_pool_pixel<T, cb>(s, xb, w, bias, relu, y + out, index + out, i, j, co0);
          else
            forward_pixel<T, cb>(s, xb, w, bias, relu, y + out, i, j, co0);
        });
      }
  });
}

// One kernel offset (di, dj), input channels ci0.., output channels co0..: CIB x CB register
// accumulators over every output pixel of one block, added to the per-lane partial sums.
template <typename T, int CIB, int CB>
inline void weight_grad_tile(const Shape& s, const T* xb, const T* dyb, Vec<T>* part, int64_t di,
                             int64_t dj, int64_t ci0, int64_t co0) {
  const int64_t i0 = std::max<int64_t>(0, s.ph - di), i1 = std::min(s.Ho, s.H + s.ph - di);
  const int64_t j0 = std::max<int64_t>(0, s.pw - dj), j1 = std::min(s.Wo, s.W + s.pw - dj);
  for (int64_t lane0 = 0; lane0 < kBlock; lane0 += kLanes<T>) {
    Vec<T> acc[CIB][CB];
    for (int a = 0; a < CIB; ++a)
      for (int c = 0; c < CB; ++c) acc[a][c] = Vec<T>{};
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) {
        const T* xp =
            xb + (((i + di - s.ph) * s.W + (j + dj - s.pw)) * s.Ci + ci0) * kBlock + lane0;
        const T* dp = dyb + ((i * s.Wo + j) * s.Co + co0) * kBlock + lane0;
        Vec<T> xv[CIB], dv[CB];
        for (int a = 0; a < CIB; ++a) xv[a] = load(xp + a * kBlock);
        for (int c = 0; c < CB; ++c) dv[c] = load(dp + c * kBlock);
        for (int a = 0; a < CIB; ++a)
          for (int c = 0; c < CB; ++c) acc[a][c] += xv[a] * dv[c];
      }
    for (int a = 0; a < CIB; ++a)
      for (int c = 0; c < CB; ++c)
        part[((di * s.kw + dj) * s.Ci + ci0 + a) * s.Co + co0 + c] += acc[a][c];
  }
}

template <typename T>
void conv_weight_grad(ffi::ThreadPool& pool, const Shape& s, const T* x, const T* dy, T* dw) {
  constexpr int64_t kMaxCIB = 6, kMaxCB = 4;
  const int64_t K = s.kh * s.kw * s.Ci * s.Co;
  // blocks are split into chunks, each with its own per-lane partial sums of dw
  const int64_t chunks = std::min<int64_t>(s.B, 2 * std::max<int64_t>(1, pool.num_threads()));
  std::vector<Vec<T>> parts(chunks * K, Vec<T>{});
  Vec<T>* parts_data = parts.data();
  parallel_for(pool, chunks, [=](int64_t chunk) {
    Vec<T>* part = parts_data + chunk * K;
    for (int64_t b = chunk * s.B / chunks; b < (chunk + 1) * s.B / chunks; ++b) {
      const T* xb = x + b * s.H * s.W * s.Ci * kBlock;
      const T* dyb = dy + b * s.Ho * s.Wo * s.Co * kBlock;
      for (int64_t di = 0; di < s.kh; ++di)
        for (int64_t dj = 0; dj < s.kw; ++dj)
          for (int64_t ci0 = 0; ci0 < s.Ci; ci0 += kMaxCIB)
            for (int64_t co0 = 0; co0 < s.Co; co0 += kMaxCB)
              with_static<kMaxCIB>(std::min(kMaxCIB, s.Ci - ci0), [&](auto cib) {
                with_static<kMaxCB>(std::min(kMaxCB, s.Co - co0), [&](auto cb) {
                  weight_grad_tile<T, cib, cb>(s, xb, dyb, part, di, dj, ci0, co0);
                });
              });
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> sum = parts[k];
    for (int64_t c = 1; c < chunks; ++c) sum += parts[c * K + k];
    T total = 0;
    for (int l = 0; l < kLanes<T>; ++l) total += sum[l];
    dw[k] = total;
  }
}

ffi::Unexpected<ffi::Error> invalid(const char* message) {
  return ffi::Unexpected<ffi::Error>(ffi::Error::InvalidArgument(message));
}

// x (B, H, W, Ci, NB), a kernel of shape `kernel` (kh, kw, Ci, Co) and a bias (Co,), checked.
ffi::ErrorOr<Shape> shape_of(ffi::AnyBuffer x, ffi::Span<const int64_t> kernel,
                             std::optional<ffi::AnyBuffer> bias, int64_t ph, int64_t pw) {
  auto xd = x.dimensions();
  if (xd.size() != 5 || xd[4] != kBlock)
    return invalid("dd_jax conv: images must be (B, H, W, C, 32)");
  if (kernel.size() != 4 || kernel[2] != xd[3])
    return invalid("dd_jax conv: the kernel must be (kh, kw, C, Co)");
  if (bias && (bias->dimensions().size() != 1 || bias->dimensions()[0] != kernel[3]))
    return invalid("dd_jax conv: the bias must be (Co,)");
  Shape s{xd[0], xd[1], xd[2], xd[3], kernel[3], kernel[0], kernel[1], ph, pw,
          xd[1] + 2 * ph - kernel[0] + 1, xd[2] + 2 * pw - kernel[1] + 1};
  if (ph < 0 || pw < 0 || ph >= s.kh || pw >= s.kw || s.Ho < 1 || s.Wo < 1)
    return invalid("dd_jax conv: padding must be in [0, kernel size)");
  return s;
}

// Calls f(T{}) for the buffers' common float type.
template <typename F>
ffi::Error with_float_type(std::initializer_list<ffi::DataType> types, F f) {
  const ffi::DataType t = *types.begin();
  for (ffi::DataType u : types)
    if (u != t) return ffi::Error::InvalidArgument("dd_jax conv: mixed dtypes");
  if (t == ffi::F32) return f(float{});
  if (t == ffi::F64) return f(double{});
  return ffi::Error::InvalidArgument("dd_jax conv: float32 or float64 only");
}

// The forward pass into y, pooled when `index` (the argmax) is given.
ffi::Error forward(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                   ffi::AnyBuffer y, int8_t* index, int64_t ph, int64_t pw, bool relu) {
  auto s = shape_of(x, w.dimensions(), bias, ph, pw);
  if (s.has_error()) return s.error();
  if (index && (s->Ho % 2 || s->Wo % 2))
    return ffi::Error::InvalidArgument("dd_jax conv: pooling needs an even output");
  auto types = {x.element_type(), w.element_type(), bias.element_type(), y.element_type()};
  return with_float_type(types, [&](auto t) {
    using T = decltype(t);
    conv_forward<T>(pool, *s, x.typed_data<T>(), w.typed_data<T>(), bias.typed_data<T>(), relu,
                    y.typed_data<T>(), index, index != nullptr);
    return ffi::Error::Success();
  });
}

ffi::Error ConvForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                           ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y, int64_t ph,
                           int64_t pw, bool relu) {
  return forward(pool, x, w, bias, *y, nullptr, ph, pw, relu);
}

ffi::Error ConvPoolForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                               ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y,
                               ffi::Result<ffi::AnyBuffer> index, int64_t ph, int64_t pw,
                               bool relu) {
  if (index->element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("dd_jax conv: the index is int8");
  return forward(pool, x, w, bias, *y, index->typed_data<int8_t>(), ph, pw, relu);
}

ffi::Error ConvWeightGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                              ffi::Result<ffi::AnyBuffer> dw, int64_t ph, int64_t pw) {
  auto s = shape_of(x, dw->dimensions(), std::nullopt, ph, pw);
  if (s.has_error()) return s.error();
  auto dd = dy.dimensions();
  if (dd.size() != 5 || dd[0] != s->B || dd[1] != s->Ho || dd[2] != s->Wo || dd[3] != s->Co ||
      dd[4] != kBlock)
    return ffi::Error::InvalidArgument("dd_jax conv: dy must be (B, Ho, Wo, Co, 32)");
  return with_float_type({x.element_type(), dy.element_type(), dw->element_type()}, [&](auto t) {
    using T = decltype(t);
    conv_weight_grad<T>(pool, *s, x.typed_data<T>(), dy.typed_data<T>(), dw->typed_data<T>());
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attr<int64_t>("padding_h")
                                  .Attr<int64_t>("padding_w")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxConvPoolForward, ConvPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // bias
                                  .Ret<ffi::AnyBuffer>()  // pooled y
                                  .Ret<ffi::AnyBuffer>()  // argmax index
                                  .Attr<int64_t>("padding_h")
                                  .Attr<int64_t>("padding_w")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxConvWeightGrad, ConvWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Attr<int64_t>("padding_h")
                                  .Attr<int64_t>("padding_w"));
