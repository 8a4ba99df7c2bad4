// Direct 2-D convolution kernels for XLA:CPU, called through the XLA FFI (dd_jax/native.py).
//
// Layout "blocked": an image batch is (B, H, W, C, NB): NB = 16 or 32 images per block, the
// block's images innermost. Every multiply-add then works on whole SIMD registers whatever the
// channel counts are (LeNet's 1 -> 6 -> 16 channels leave matmuls on channels far too narrow).
// Every operand may have the same number of leading axes in front (ffi_call's vmap_method
// "expand_dims": one per vmap, e.g. over networks), each of the output's size or 1 (not
// batched there, shared); one call then computes all of them.
// Kernels are HWIO (kh, kw, Ci, Co); stride 1, zero padding ph rows and pw columns on each side.
//   DdJaxConvForward:     y[b, i, j, co, :] =
//                           act(bias[co] + sum_{di, dj, ci} w[di, dj, ci, co] x[b, i+di-ph, j+dj-pw, ci, :])
//   DdJaxConvPoolForward: the same with 2x2 max pooling before the bias, and the argmax (int8)
//   DdJaxConvWeightGrad:  dw[di, dj, ci, co] =
//                           sum_{b, i, j, lanes} x[b, i+di-ph, j+dj-pw, ci, :] dy[b, i, j, co, :]
//   DdJaxConvWeightGradPooled: the same from the gradient at the 2x2-max-pooled output (+ relu),
//                         dy unpooled a block at a time, two rows with one input channel
//                         (never all of it in memory), and the bias gradient
//   DdJaxUnpool:          the gradient of 2x2 max pooling (+ relu) from the argmax and the output
//   DdJaxPoolGather:      its transpose (native.py: each is the other's derivative)
// act is relu or the identity. The input gradient is DdJaxConvForward of dy with the flipped,
// transposed kernel and padding (kh-1-ph, kw-1-pw) (native.py): with the weight gradient, the
// convolution is closed under differentiation. float32 and float64; the blocks are split over
// XLA's intra-op thread pool, and the result does not depend on which thread does what.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using namespace dd_jax_native;

struct Shape {
  int64_t B, H, W, Ci, Co, kh, kw, ph, pw, Ho, Wo;
};

// acc = the convolution at output pixel (i, j) of one block, output channels co0 .. co0+CB-1:
// CB x kRegsPerBlock accumulators in registers; each loaded input register feeds CB
// multiply-adds.
template <typename T, int NB, int CB>
inline void accumulate_pixel(const Shape& s, const T* xb, const T* w, int64_t i, int64_t j,
                             int64_t co0, Vec<T> (&acc)[CB][kRegsPerBlock<T, NB>]) {
  constexpr int R = kRegsPerBlock<T, NB>;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = Vec<T>{};
  const int64_t di0 = std::max<int64_t>(0, s.ph - i), di1 = std::min(s.kh, s.H + s.ph - i);
  const int64_t dj0 = std::max<int64_t>(0, s.pw - j), dj1 = std::min(s.kw, s.W + s.pw - j);
  for (int64_t di = di0; di < di1; ++di)
    for (int64_t dj = dj0; dj < dj1; ++dj) {
      const T* xp = xb + ((i + di - s.ph) * s.W + (j + dj - s.pw)) * s.Ci * NB;
      const T* wp = w + (di * s.kw + dj) * s.Ci * s.Co + co0;
      for (int64_t ci = 0; ci < s.Ci; ++ci) {
        Vec<T> xv[R];
        for (int r = 0; r < R; ++r) xv[r] = load(xp + ci * NB + r * kLanes<T>);
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
template <typename T, int NB, int CB>
inline void forward_pixel(const Shape& s, const T* xb, const T* w, const T* bias, bool relu,
                          T* y, int64_t i, int64_t j, int64_t co0) {
  constexpr int R = kRegsPerBlock<T, NB>;
  Vec<T> acc[CB][R];
  accumulate_pixel<T, NB, CB>(s, xb, w, i, j, co0, acc);
  T* out = y + ((i * s.Wo + j) * s.Co + co0) * NB;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r)
      store(out + c * NB + r * kLanes<T>, finish(acc[c][r], bias[co0 + c], relu));
}

// acc[u * PJ + v] = the convolution at output pixel (i+u, j+v) of one block, u < PI, v < PJ,
// output channels co0..: PI x PJ x CB x R accumulators in registers over kernel rows
// [di0, di1) and every kernel column (the tile's windows must lie inside the columns of x).
// Each kernel weight loaded feeds PI x PJ x R multiply-adds, where a single pixel of few
// channels would load a weight for every R of them and wait on one chain of multiply-adds.
template <typename T, int NB, int CB, int PI, int PJ>
inline void accumulate_tile(const Shape& s, const T* xb, const T* w, int64_t i, int64_t j,
                            int64_t di0, int64_t di1, int64_t co0,
                            Vec<T> (&acc)[PI * PJ][CB][kRegsPerBlock<T, NB>]) {
  constexpr int R = kRegsPerBlock<T, NB>, P = PI * PJ;
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < CB; ++c)
      for (int r = 0; r < R; ++r) acc[p][c][r] = Vec<T>{};
  const int64_t column = s.Ci * NB, row = s.W * column;  // from one input column / row to the next
  for (int64_t di = di0; di < di1; ++di)
    for (int64_t dj = 0; dj < s.kw; ++dj) {
      const T* xp = xb + (i + di - s.ph) * row + (j + dj - s.pw) * column;
      const T* wp = w + (di * s.kw + dj) * s.Ci * s.Co + co0;
      for (int64_t ci = 0; ci < s.Ci; ++ci)
        for (int p = 0; p < P; ++p) {  // one pixel's input registers at a time
          Vec<T> xv[R];
          for (int r = 0; r < R; ++r)
            xv[r] = load(xp + (p / PJ) * row + (p % PJ) * column + ci * NB + r * kLanes<T>);
          for (int c = 0; c < CB; ++c) {
            const T wv = wp[ci * s.Co + c];
            for (int r = 0; r < R; ++r) acc[p][c][r] += wv * xv[r];
          }
        }
    }
}

// PJ consecutive output pixels (i, j) .. (i, j+PJ-1) whose windows lie inside the columns of
// the padded input (every kernel column inside x): y[b, i, j.., co0 .. co0+CB-1, :].
template <typename T, int NB, int CB, int PJ>
inline void forward_pixels(const Shape& s, const T* xb, const T* w, const T* bias, bool relu,
                           T* y, int64_t i, int64_t j, int64_t co0) {
  constexpr int R = kRegsPerBlock<T, NB>;
  Vec<T> acc[PJ][CB][R];
  accumulate_tile<T, NB, CB, 1, PJ>(s, xb, w, i, j, std::max<int64_t>(0, s.ph - i),
                                    std::min(s.kh, s.H + s.ph - i), co0, acc);
  for (int p = 0; p < PJ; ++p) {
    T* out = y + ((i * s.Wo + j + p) * s.Co + co0) * NB;
    for (int c = 0; c < CB; ++c)
      for (int r = 0; r < R; ++r)
        store(out + c * NB + r * kLanes<T>, finish(acc[p][c][r], bias[co0 + c], relu));
  }
}

// Pooled pixel (i, j) of 2x2 max pooling from acc[k], the output pixels (2i+u, 2j+v) at
// k = 2u + v, R registers of lanes from lane0: their max and which one, the first in that
// order on ties (as PyTorch's MaxPool2d); bias and relu after the max (the same as before it).
template <typename T, int NB, int CB, int R = kRegsPerBlock<T, NB>>
inline void store_pooled(const Shape& s, Vec<T> (&acc)[4][CB][R], const T* bias, bool relu,
                         T* y, int8_t* index, int64_t i, int64_t j, int64_t co0,
                         int64_t lane0 = 0) {
  const int64_t at = ((i * (s.Wo / 2) + j) * s.Co + co0) * NB + lane0;
  for (int c = 0; c < CB; ++c)
    for (int r = 0; r < R; ++r) {
      Vec<T> best = acc[0][c][r];
      Mask<T> which = Mask<T>{};
      for (int k = 1; k < 4; ++k) {
        const Mask<T> more = acc[k][c][r] > best;
        best = more ? acc[k][c][r] : best;
        which = more ? Mask<T>{} + k : which;
      }
      store(y + at + c * NB + r * kLanes<T>, finish(best, bias[co0 + c], relu));
      const auto k = __builtin_convertvector(which, typename Reg<T>::bytes);
      std::memcpy(index + at + c * NB + r * kLanes<T>, &k, sizeof k);
    }
}

// One pooled pixel (i, j), its four output pixels one after the other (any position).
template <typename T, int NB, int CB>
inline void forward_pool_pixel(const Shape& s, const T* xb, const T* w, const T* bias, bool relu,
                               T* y, int8_t* index, int64_t i, int64_t j, int64_t co0) {
  Vec<T> acc[4][CB][kRegsPerBlock<T, NB>];
  for (int k = 0; k < 4; ++k)
    accumulate_pixel<T, NB, CB>(s, xb, w, 2 * i + k / 2, 2 * j + k % 2, co0, acc[k]);
  store_pooled<T, NB, CB>(s, acc, bias, relu, y, index, i, j, co0);
}

// One pooled pixel (i, j) whose four output pixels' windows lie inside x: the four as one
// 2 x 2 `accumulate_tile` (the same sums in the same order as `forward_pool_pixel`'s).
template <typename T, int NB, int CB>
inline void forward_pool_pixel_inside(const Shape& s, const T* xb, const T* w, const T* bias,
                                      bool relu, T* y, int8_t* index, int64_t i, int64_t j,
                                      int64_t co0) {
  Vec<T> acc[4][CB][kRegsPerBlock<T, NB>];
  accumulate_tile<T, NB, CB, 2, 2>(s, xb, w, 2 * i, 2 * j, 0, s.kh, co0, acc);
  store_pooled<T, NB, CB>(s, acc, bias, relu, y, index, i, j, co0);
}

// A single input channel (Ci = 1) with 2x2 max pooling: pooled row i of one block, output
// channels co0 .. co0+CB-1, for a kernel KW wide. xrows (kh + 1, W + 2 pw, NB) holds input rows
// 2i-ph .. 2i+kh-ph (zero outside x) with their columns zero-padded. One register of lanes at
// a time; per kernel row the KW x CB weights stay in registers, and each input loaded feeds
// both output columns of the pooling window that meet it (the same sums in the same order as
// `forward_pool_pixel_inside`'s, the padding's zeros included).
template <typename T, int NB, int KW, int CB>
inline void forward_pool_row_one_channel(const Shape& s, const T* xrows, const T* w,
                                         const T* bias, bool relu, T* y, int8_t* index,
                                         int64_t i, int64_t co0) {
  const int64_t wp = s.W + 2 * s.pw;
  for (int64_t lane0 = 0; lane0 < NB; lane0 += kLanes<T>)
    for (int64_t j = 0; j < s.Wo / 2; ++j) {
      Vec<T> acc[4][CB][1];
      for (int k = 0; k < 4; ++k)
        for (int c = 0; c < CB; ++c) acc[k][c][0] = Vec<T>{};
      for (int64_t di = 0; di < s.kh; ++di) {
        Vec<T> wv[KW][CB];
        for (int dj = 0; dj < KW; ++dj)
          for (int c = 0; c < CB; ++c)  // w - 0: the weight in every lane (w + 0 is not w at -0)
            wv[dj][c] = w[(di * KW + dj) * s.Co + co0 + c] - Vec<T>{};
        for (int u = 0; u < 2; ++u) {
          const T* xr = xrows + ((u + di) * wp + 2 * j) * NB + lane0;
#pragma GCC unroll 8
          for (int col = 0; col <= KW; ++col) {  // input column 2j + col meets taps col, col-1
            const Vec<T> xv = load(xr + col * NB);
            for (int v = 0; v < 2; ++v)
              if (col - v >= 0 && col - v < KW)
                for (int c = 0; c < CB; ++c) acc[2 * u + v][c][0] += xv * wv[col - v][c];
          }
        }
      }
      store_pooled<T, NB, CB, 1>(s, acc, bias, relu, y, index, i, j, co0, lane0);
    }
}

// Input row h of a single-channel block xb (Ci = 1; zero outside x) into `row` (W + 2 pw, NB),
// with pw zero columns on both sides.
template <typename T, int NB>
inline void padded_row(const Shape& s, const T* xb, int64_t h, T* row) {
  const int64_t wp = s.W + 2 * s.pw;
  if (h < 0 || h >= s.H) {
    std::fill(row, row + wp * NB, T{0});
    return;
  }
  std::fill(row, row + s.pw * NB, T{0});
  std::memcpy(row + s.pw * NB, xb + h * s.W * NB, s.W * NB * sizeof(T));
  std::fill(row + (s.pw + s.W) * NB, row + wp * NB, T{0});
}

// y = the convolution of x with w, or with `max_pool` its 2x2 max pooling and the argmax
// `index`; then + bias, and with `relu` rectified; for every item of the leading axes.
template <typename T, int NB>
void conv_forward(ffi::ThreadPool& pool, const Shape& s, int64_t items, const T* x,
                  const Operand& xo, const T* w, const Operand& wo, const T* bias,
                  const Operand& bo, bool relu, T* y, int8_t* index, bool max_pool) {
  constexpr int R = kRegsPerBlock<T, NB>;
  const int64_t rows = max_pool ? s.Ho / 2 : s.Ho, cols = max_pool ? s.Wo / 2 : s.Wo;
  // accumulators in registers: four output pixels' with pooling
  constexpr int64_t kMaxPoolCB = std::max(1, 6 / R), kMaxCB = 16 / R, kMaxOneChannelKW = 5;
  const int64_t max_cb = max_pool ? kMaxPoolCB : kMaxCB;
  const int64_t out_item = s.B * rows * cols * s.Co * NB;
  parallel_for(pool, items * s.B * rows, [=, &xo, &wo, &bo](int64_t task) {
    const int64_t n = task / (s.B * rows), b = task / rows % s.B, i = task % rows;
    const T* xb = x + xo.offsets[n] + b * s.H * s.W * s.Ci * NB;
    const T* wn = w + wo.offsets[n];
    const T* bn = bias + bo.offsets[n];
    const int64_t out = n * out_item + b * rows * cols * s.Co * NB;
    if (max_pool && s.Ci == 1 && s.kw <= kMaxOneChannelKW) {
      std::unique_ptr<T[]> xrows(new T[(s.kh + 1) * (s.W + 2 * s.pw) * NB]);
      for (int64_t r = 0; r <= s.kh; ++r)  // input rows 2i-ph .. 2i+kh-ph
        padded_row<T, NB>(s, xb, 2 * i - s.ph + r, xrows.get() + r * (s.W + 2 * s.pw) * NB);
      constexpr int64_t kOneChannelCB = 3;  // 12 accumulators, 5 x 3 weights in registers
      for (int64_t co0 = 0; co0 < s.Co; co0 += kOneChannelCB)
        with_static<kMaxOneChannelKW>(s.kw, [&](auto kw) {
          with_static<kOneChannelCB>(std::min(kOneChannelCB, s.Co - co0), [&](auto cb) {
            forward_pool_row_one_channel<T, NB, kw, cb>(s, xrows.get(), wn, bn, relu, y + out,
                                                         index + out, i, co0);
          });
        });
      return;
    }
    for (int64_t co0 = 0; co0 < s.Co; co0 += max_cb)
      with_static<kMaxCB>(std::min(max_cb, s.Co - co0), [&](auto cb) {
        if constexpr (cb <= kMaxPoolCB) {
          if (max_pool) {  // pooled pixel (i, j) reads input rows 2i-ph .. 2i+kh-ph
            const bool rows_inside = 2 * i >= s.ph && 2 * i + s.kh - s.ph < s.H;
            for (int64_t j = 0; j < cols; ++j)
              if (rows_inside && 2 * j >= s.pw && 2 * j + s.kw - s.pw < s.W)
                forward_pool_pixel_inside<T, NB, cb>(s, xb, wn, bn, relu, y + out, index + out,
                                                     i, j, co0);
              else
                forward_pool_pixel<T, NB, cb>(s, xb, wn, bn, relu, y + out, index + out, i, j,
                                              co0);
            return;
          }
        }
        // pixels side by side, up to 24 accumulators, where their windows allow
        constexpr int PJ = std::max(1, std::min(8, 24 / (cb * R)));
        for (int64_t j = 0; j < cols;) {
          if (PJ > 1 && j >= s.pw && j + PJ + s.kw - 2 - s.pw < s.W) {
            forward_pixels<T, NB, cb, PJ>(s, xb, wn, bn, relu, y + out, i, j, co0);
            j += PJ;
          } else {
            forward_pixel<T, NB, cb>(s, xb, wn, bn, relu, y + out, i, j, co0);
            ++j;
          }
        }
      });
  });
}

// Pooled row (b, i) of the gradient of 2x2 max pooling followed by `relu` (y = its output), or
// of its transpose; the row's pooled entries (w, C, NB) and its two unpooled rows (2, 2w, C, NB).
// With gather false, `from` is the pooled row and `to` the unpooled rows:
// to[u, 2j+v, c, :] = from[j, c, :] where index[j, c, :] == 2u+v (and y > 0), else 0. With
// gather true, `from` is the unpooled rows and `to` the pooled row: to[j, c, :] = from at the
// window position index[j, c, :] (where y > 0), else 0.
template <typename T, int NB>
inline void pool_grad_row(int64_t w, int64_t C, const T* from, T* to, const T* yp,
                          const int8_t* ip, bool relu, bool gather) {
  const int64_t row = w * C * NB;  // one pooled row; an unpooled row is twice as long
  for (int64_t j = 0; j < w; ++j)
    for (int64_t e = j * C * NB; e < (j + 1) * C * NB; e += kLanes<T>) {
      typename Reg<T>::bytes kb;
      std::memcpy(&kb, ip + e, sizeof kb);
      const Mask<T> k = __builtin_convertvector(kb, Mask<T>);
      const Mask<T> keep = relu ? Mask<T>(load(yp + e) > 0) : Mask<T>{} - 1;
      const int64_t c = e - j * C * NB;  // within pixel j: (channel, lane)
      const int64_t at[4] = {2 * j * C * NB + c, (2 * j + 1) * C * NB + c,
                             row * 2 + 2 * j * C * NB + c, row * 2 + (2 * j + 1) * C * NB + c};
      if (gather) {
        Vec<T> v = Vec<T>{};
        for (int q = 0; q < 4; ++q) v = k == q ? load(from + at[q]) : v;
        store(to + e, keep ? v : Vec<T>{});
      } else {
        const Vec<T> g = keep ? load(from + e) : Vec<T>{};
        for (int q = 0; q < 4; ++q) store(to + at[q], k == q ? g : Vec<T>{});
      }
    }
}

// Kernel row di and column dj, input channels ci0 .. ci0+CIB-1, output channels
// co0 .. co0+CB-1: CIB x CB register accumulators over the output pixels of one block where
// the kernel entry lies inside x, added to the per-lane partial sums.
template <typename T, int NB, int CIB, int CB>
inline void weight_grad_tile(const Shape& s, const T* xb, const T* dyb, Vec<T>* part, int64_t di,
                             int64_t dj, int64_t ci0, int64_t co0) {
  const int64_t i0 = std::max<int64_t>(0, s.ph - di), i1 = std::min(s.Ho, s.H + s.ph - di);
  const int64_t j0 = std::max<int64_t>(0, s.pw - dj), j1 = std::min(s.Wo, s.W + s.pw - dj);
  for (int64_t lane0 = 0; lane0 < NB; lane0 += kLanes<T>) {
    Vec<T> acc[CIB][CB];
    for (int a = 0; a < CIB; ++a)
      for (int c = 0; c < CB; ++c) acc[a][c] = Vec<T>{};
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = j0; j < j1; ++j) {
        const T* xp = xb + (((i + di - s.ph) * s.W + (j + dj - s.pw)) * s.Ci + ci0) * NB + lane0;
        const T* dp = dyb + ((i * s.Wo + j) * s.Co + co0) * NB + lane0;
        Vec<T> xv[CIB], dv[CB];
        for (int a = 0; a < CIB; ++a) xv[a] = load(xp + a * NB);
        for (int c = 0; c < CB; ++c) dv[c] = load(dp + c * NB);
        for (int a = 0; a < CIB; ++a)
          for (int c = 0; c < CB; ++c) acc[a][c] += xv[a] * dv[c];
      }
    for (int a = 0; a < CIB; ++a)
      for (int c = 0; c < CB; ++c)
        part[((di * s.kw + dj) * s.Ci + ci0 + a) * s.Co + co0 + c] += acc[a][c];
  }
}

// A single input channel (Ci = 1), output row i: the sums over its pixels for kernel row di,
// columns dj0 .. dj0+DJ-1, output channels co0 .. co0+CB-1, lanes lane0.. (one register), in
// DJ x CB register accumulators added to the per-lane partial sums at the end: each pixel's CB
// output gradients and DJ inputs loaded once feed DJ x CB multiply-adds. xrow is input row
// i+di-ph with its columns zero-padded (column c of x at c + pw), dyrow dy's row i (Wo, Co, NB).
template <typename T, int NB, int DJ, int CB>
inline void weight_grad_row_tile(const Shape& s, const T* xrow, const T* dyrow, Vec<T>* part,
                                 int64_t di, int64_t dj0, int64_t co0, int64_t lane0) {
  Vec<T> acc[DJ][CB];
  for (int a = 0; a < DJ; ++a)
    for (int c = 0; c < CB; ++c) acc[a][c] = Vec<T>{};
  for (int64_t j = 0; j < s.Wo; ++j) {
    Vec<T> d[CB];
    for (int c = 0; c < CB; ++c) d[c] = load(dyrow + (j * s.Co + co0 + c) * NB + lane0);
    for (int a = 0; a < DJ; ++a) {
      const Vec<T> xv = load(xrow + (j + dj0 + a) * NB + lane0);
      for (int c = 0; c < CB; ++c) acc[a][c] += xv * d[c];
    }
  }
  for (int a = 0; a < DJ; ++a)
    for (int c = 0; c < CB; ++c) part[(di * s.kw + dj0 + a) * s.Co + co0 + c] += acc[a][c];
}

// The gradient at a 2x2 max pooling's output (+ relu) from which a weight gradient unpools
// its dy (`pool_grad_row`): g, y (the pooled, rectified output) and the argmax index, each
// (B, Ho/2, Wo/2, Co, NB) per item.
template <typename T>
struct PooledGrad {
  const T* g;
  Operand go;
  const T* y;
  Operand yo;
  const int8_t* index;
  Operand io;
  bool relu;
};

// Unpools `rows` consecutive pooled rows of item n of `p` (each (w, C, NB)), from pooled row
// `first` (counted across the item's blocks), into `out` (2 rows, 2w wide, for each).
template <typename T, int NB>
inline void unpool_rows(const PooledGrad<T>& p, int64_t n, int64_t first, int64_t rows, int64_t w,
                        int64_t C, T* out) {
  const int64_t prow = w * C * NB;
  for (int64_t i = 0, at = first * prow; i < rows; ++i, at += prow)
    pool_grad_row<T, NB>(w, C, p.g + p.go.offsets[n] + at, out + i * 4 * prow,
                         p.y + p.yo.offsets[n] + at, p.index + p.io.offsets[n] + at, p.relu,
                         false);
}

// A single input channel (Ci = 1): one block's sums for kernel rows [di_lo, di_hi), output row
// by output row, so that the row of dy and the input rows it meets stay in L1 across every
// (kernel row, kernel columns, output channels, lanes) pass over them. dy is block b of item n
// of `pooled` unpooled two rows at a time into `rows` (2, Wo, Co, NB), or without it dyb
// (Ho, Wo, Co, NB). xpad (H, W + 2 pw, NB) receives the block's input with its columns
// zero-padded.
template <typename T, int NB>
void weight_grad_one_channel(const Shape& s, const T* xb, const T* dyb,
                             const PooledGrad<T>* pooled, int64_t n, int64_t b, T* rows,
                             T* xpad, Vec<T>* part, int64_t di_lo, int64_t di_hi) {
  constexpr int64_t kMaxDJ = 5, kMaxCB = 4;
  const int64_t wp = s.W + 2 * s.pw, dy_row = s.Wo * s.Co * NB;
  for (int64_t h = 0; h < s.H; ++h) padded_row<T, NB>(s, xb, h, xpad + h * wp * NB);
  const int64_t tiles = (s.Co + kMaxCB - 1) / kMaxCB, cb = (s.Co + tiles - 1) / tiles;
  for (int64_t i = 0; i < s.Ho; ++i) {
    if (pooled && i % 2 == 0)
      unpool_rows<T, NB>(*pooled, n, b * (s.Ho / 2) + i / 2, 1, s.Wo / 2, s.Co, rows);
    const T* dyrow = pooled ? rows + i % 2 * dy_row : dyb + i * dy_row;
    const int64_t di0 = std::max(di_lo, s.ph - i), di1 = std::min(di_hi, s.H + s.ph - i);
    for (int64_t lane0 = 0; lane0 < NB; lane0 += kLanes<T>)
      for (int64_t di = di0; di < di1; ++di)
        for (int64_t dj0 = 0; dj0 < s.kw; dj0 += kMaxDJ)
          for (int64_t co0 = 0; co0 < s.Co; co0 += cb)
            with_static<kMaxDJ>(std::min(kMaxDJ, s.kw - dj0), [&](auto dj) {
              with_static<kMaxCB>(std::min(cb, s.Co - co0), [&](auto c) {
                weight_grad_row_tile<T, NB, dj, c>(s, xpad + (i + di - s.ph) * wp * NB, dyrow,
                                                   part, di, dj0, co0, lane0);
              });
            });
  }
}

// dw for every item of the leading axes, from dy, or with `pooled` from the pooling gradient
// (dy is then unpooled one block at a time into a buffer of the task's: never all of it in
// memory). The work is split into (item, chunk of blocks) tasks, each chunk with its own
// per-lane partial sums, added up in a fixed order at the end; when that leaves threads idle
// (one block per item), the kernel's rows are split too.
template <typename T, int NB>
void conv_weight_grad(ffi::ThreadPool& pool, const Shape& s, int64_t items, const T* x,
                      const Operand& xo, const T* dy, const Operand& dyo, T* dw,
                      const PooledGrad<T>* pooled = nullptr) {
  constexpr int64_t kMaxCIB = 6, kMaxCB = 4;
  const int64_t K = s.kh * s.kw * s.Ci * s.Co;
  if (items == 0 || s.B == 0) {  // no items, or no images: a zero gradient
    std::fill(dw, dw + items * K, T{0});
    return;
  }
  const int64_t tasks = 2 * std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(s.B, std::max<int64_t>(1, tasks / items));
  const int64_t splits = items * chunks < tasks ? s.kh : 1;  // of the rows di
  const int64_t block = s.Ho * s.Wo * s.Co * NB, pooled_rows = s.Ho / 2;  // per block
  if (pooled && splits > 1) {  // every split would unpool the same blocks: unpool them once
    const int64_t rows = s.B * pooled_rows, unpooled_rows = block / pooled_rows;  // 2 per row
    std::unique_ptr<T[]> unpooled(new T[items * s.B * block]);
    Operand uo;
    for (int64_t n = 0; n < items; ++n) uo.offsets.push_back(n * s.B * block);
    T* u = unpooled.get();
    parallel_for(pool, items * rows, [=](int64_t task) {
      const int64_t n = task / rows, row = task % rows;
      unpool_rows<T, NB>(*pooled, n, row, 1, s.Wo / 2, s.Co,
                         u + n * s.B * block + row * unpooled_rows);
    });
    conv_weight_grad<T, NB>(pool, s, items, x, xo, u, uo, dw);
    return;
  }
  // left uninitialised: each task zeroes the sums it adds to (its kernel rows of its chunk's)
  std::unique_ptr<Vec<T>[]> parts(new Vec<T>[items * chunks * K]);
  Vec<T>* parts_data = parts.get();
  parallel_for(pool, items * chunks * splits, [=, &xo, &dyo](int64_t task) {
    const int64_t n = task / (chunks * splits), chunk = task / splits % chunks;
    const int64_t split = task % splits;
    const int64_t di_lo = split * s.kh / splits, di_hi = (split + 1) * s.kh / splits;
    Vec<T>* part = parts_data + (n * chunks + chunk) * K;
    std::fill(part + di_lo * s.kw * s.Ci * s.Co, part + di_hi * s.kw * s.Ci * s.Co, Vec<T>{});
    if (s.Ci == 1) {  // dy two rows at a time (pooled), the input padded
      std::unique_ptr<T[]> rows(pooled ? new T[2 * s.Wo * s.Co * NB] : nullptr);
      std::unique_ptr<T[]> xpad(new T[s.H * (s.W + 2 * s.pw) * NB]);
      for (int64_t b = chunk * s.B / chunks; b < (chunk + 1) * s.B / chunks; ++b)
        weight_grad_one_channel<T, NB>(s, x + xo.offsets[n] + b * s.H * s.W * NB,
                                       pooled ? nullptr : dy + dyo.offsets[n] + b * block,
                                       pooled, n, b, rows.get(), xpad.get(), part, di_lo, di_hi);
      return;
    }
    std::unique_ptr<T[]> unpooled(pooled ? new T[block] : nullptr);
    for (int64_t b = chunk * s.B / chunks; b < (chunk + 1) * s.B / chunks; ++b) {
      const T* xb = x + xo.offsets[n] + b * s.H * s.W * s.Ci * NB;
      const T* dyb = unpooled.get();
      if (pooled)
        unpool_rows<T, NB>(*pooled, n, b * pooled_rows, pooled_rows, s.Wo / 2, s.Co,
                           unpooled.get());
      else
        dyb = dy + dyo.offsets[n] + b * block;
      for (int64_t di = di_lo; di < di_hi; ++di) {
        for (int64_t dj = 0; dj < s.kw; ++dj)
          for (int64_t ci0 = 0; ci0 < s.Ci; ci0 += kMaxCIB)
            for (int64_t co0 = 0; co0 < s.Co; co0 += kMaxCB)
              with_static<kMaxCIB>(std::min(kMaxCIB, s.Ci - ci0), [&](auto cib) {
                with_static<kMaxCB>(std::min(kMaxCB, s.Co - co0), [&](auto cb) {
                  weight_grad_tile<T, NB, cib, cb>(s, xb, dyb, part, di, dj, ci0, co0);
                });
              });
      }
    }
  });
  // the chunks' partial sums in order, then the lanes pairwise (`lane_sum`): the same order
  // whichever thread adds up which item
  parallel_for(pool, items, [=](int64_t n) {
    for (int64_t k = 0; k < K; ++k) {
      Vec<T> sum = parts_data[n * chunks * K + k];
      for (int64_t c = 1; c < chunks; ++c) sum += parts_data[(n * chunks + c) * K + k];
      dw[n * K + k] = lane_sum<T>(sum);
    }
  });
}

// `pool_grad_row` for every pooled row of every item of the leading axes: pooled (B, h, w, C,
// NB), unpooled (B, 2h, 2w, C, NB); with gather, unpooled is read into pooled, else the reverse.
template <typename T, int NB>
void pool_grad(ffi::ThreadPool& pool, int64_t items, int64_t B, int64_t h, int64_t w, int64_t C,
               T* pooled, const Operand& po, T* unpooled, const Operand& uo, const T* y,
               const Operand& yo, const int8_t* index, const Operand& io, bool relu,
               bool gather) {
  const int64_t row = w * C * NB;
  parallel_for(pool, items * B * h, [=, &po, &uo, &yo, &io](int64_t task) {
    const int64_t n = task / (B * h), bi = task % (B * h);
    T* p = pooled + po.offsets[n] + bi * row;
    T* u = unpooled + uo.offsets[n] + bi * 4 * row;  // pooled row (b, i): unpooled rows 2i, 2i+1
    pool_grad_row<T, NB>(w, C, gather ? u : p, gather ? p : u, y + yo.offsets[n] + bi * row,
                         index + io.offsets[n] + bi * row, relu, gather);
  });
}

// db[c] = the sum over (b, i, j, lanes) of g[b, i, j, c, :] (where y > 0 with `relu`): the bias
// gradient of a pooled layer, whose unpooled gradient holds the same values, for every item of
// the leading axes; g and y (B, h, w, C, NB) per item. Per-lane sums in order, then `lane_sum`.
template <typename T, int NB>
void pooled_bias_grad(ffi::ThreadPool& pool, int64_t items, int64_t pixels, int64_t C,
                      const PooledGrad<T>& p, T* db) {
  parallel_for(pool, items, [=, &p](int64_t n) {
    const T* g = p.g + p.go.offsets[n];
    const T* y = p.y + p.yo.offsets[n];
    std::vector<Vec<T>> sums(C, Vec<T>{});
    for (int64_t e = 0; e < pixels * C * NB; e += kLanes<T>) {  // in memory order
      const Vec<T> v = load(g + e);
      sums[e / NB % C] += p.relu ? (load(y + e) > 0 ? v : Vec<T>{}) : v;
    }
    for (int64_t c = 0; c < C; ++c) db[n * C + c] = lane_sum<T>(sums[c]);
  });
}

// One item's shape from x's trailing (B, H, W, Ci, NB), the kernel's (kh, kw, Ci, Co) and the
// padding, checked.
ffi::ErrorOr<Shape> shape_of(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> kernel,
                             int64_t ph, int64_t pw) {
  if (xd.size() < 5 || (xd.back() != 16 && xd.back() != 32))
    return invalid("dd_jax conv: images must be (..., B, H, W, C, 16 or 32)");
  if (kernel.size() < 4) return invalid("dd_jax conv: the kernel must be (..., kh, kw, C, Co)");
  xd = trailing(xd, 5);
  kernel = trailing(kernel, 4);
  if (kernel[2] != xd[3])
    return invalid("dd_jax conv: the kernel must be (kh, kw, C, Co)");
  Shape s{xd[0], xd[1], xd[2], xd[3], kernel[3], kernel[0], kernel[1], ph, pw,
          xd[1] + 2 * ph - kernel[0] + 1, xd[2] + 2 * pw - kernel[1] + 1};
  if (ph < 0 || pw < 0 || ph >= s.kh || pw >= s.kw || s.Ho < 1 || s.Wo < 1)
    return invalid("dd_jax conv: padding must be in [0, kernel size)");
  return s;
}

// Calls f(T{}, NB) for the buffers' common float type and the block width nb (16 or 32).
template <typename F>
ffi::Error with_types(std::initializer_list<ffi::DataType> types, int64_t nb, F f) {
  const ffi::DataType t = *types.begin();
  for (ffi::DataType u : types)
    if (u != t) return ffi::Error::InvalidArgument("dd_jax conv: mixed dtypes");
  auto with_nb = [&](auto z) {
    using T = decltype(z);
    return nb == 16 ? f(T{}, std::integral_constant<int, 16>{})
                    : f(T{}, std::integral_constant<int, 32>{});
  };
  if (t == ffi::F32) return with_nb(float{});
  if (t == ffi::F64) return with_nb(double{});
  return ffi::Error::InvalidArgument("dd_jax conv: float32 or float64 only");
}

// The forward pass into y, pooled when `index` (the argmax) is given.
ffi::Error forward(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer bias,
                   ffi::AnyBuffer y, int8_t* index, int64_t ph, int64_t pw, bool relu) {
  auto s = shape_of(x.dimensions(), w.dimensions(), ph, pw);
  if (s.has_error()) return s.error();
  if (index && (s->Ho % 2 || s->Wo % 2))
    return ffi::Error::InvalidArgument("dd_jax conv: pooling needs an even output");
  if (y.dimensions().size() < 5 || trailing(y.dimensions(), 5)[3] != s->Co)
    return ffi::Error::InvalidArgument("dd_jax conv: y must be (..., B, Ho, Wo, Co, NB)");
  const Lead lead(y.dimensions(), 5);
  Operand xo, wo, bo;
  if (!lead.operand(x.dimensions(), 5, xo) || !lead.operand(w.dimensions(), 4, wo) ||
      !lead.operand(bias.dimensions(), 1, bo) || bias.dimensions().back() != s->Co)
    return ffi::Error::InvalidArgument(
        "dd_jax conv: the leading axes or the bias (Co,) do not match");
  const int64_t nb = x.dimensions().back();
  auto types = {x.element_type(), w.element_type(), bias.element_type(), y.element_type()};
  return with_types(types, nb, [&](auto t, auto block) {
    using T = decltype(t);
    conv_forward<T, block>(pool, *s, lead.count, x.typed_data<T>(), xo, w.typed_data<T>(), wo,
                           bias.typed_data<T>(), bo, relu, y.typed_data<T>(), index,
                           index != nullptr);
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
  auto s = shape_of(x.dimensions(), dw->dimensions(), ph, pw);
  if (s.has_error()) return s.error();
  const Lead lead(dw->dimensions(), 4);
  Operand xo, dyo;
  auto dd = dy.dimensions();
  if (!lead.operand(x.dimensions(), 5, xo) || !lead.operand(dd, 5, dyo))
    return ffi::Error::InvalidArgument("dd_jax conv: the leading axes do not match");
  dd = trailing(dd, 5);
  const int64_t nb = x.dimensions().back();
  if (dd[0] != s->B || dd[1] != s->Ho || dd[2] != s->Wo || dd[3] != s->Co || dd[4] != nb)
    return ffi::Error::InvalidArgument("dd_jax conv: dy must be (B, Ho, Wo, Co, NB) as x");
  auto types = {x.element_type(), dy.element_type(), dw->element_type()};
  return with_types(types, nb, [&](auto t, auto block) {
    using T = decltype(t);
    conv_weight_grad<T, block>(pool, *s, lead.count, x.typed_data<T>(), xo, dy.typed_data<T>(),
                               dyo, dw->typed_data<T>());
    return ffi::Error::Success();
  });
}

// The weight gradient from the gradient g at the layer's 2x2-max-pooled (and with `relu`
// rectified) output y: dy = the pooling gradient of g (`pool_grad_row`), unpooled block by block.
ffi::Error ConvWeightGradPooledImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                                    ffi::AnyBuffer y, ffi::AnyBuffer index,
                                    ffi::Result<ffi::AnyBuffer> dw,
                                    ffi::Result<ffi::AnyBuffer> db, int64_t ph, int64_t pw,
                                    bool relu) {
  auto s = shape_of(x.dimensions(), dw->dimensions(), ph, pw);
  if (s.has_error()) return s.error();
  if (s->Ho % 2 || s->Wo % 2)
    return ffi::Error::InvalidArgument("dd_jax conv: pooling needs an even output");
  const Lead lead(dw->dimensions(), 4);
  Operand xo, go, yo, io;
  if (!lead.operand(x.dimensions(), 5, xo) || !lead.operand(g.dimensions(), 5, go) ||
      !lead.operand(y.dimensions(), 5, yo) || !lead.operand(index.dimensions(), 5, io) ||
      index.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("dd_jax conv: the leading axes or the index do not match");
  const int64_t nb = x.dimensions().back();
  for (auto d : {g.dimensions(), y.dimensions(), index.dimensions()}) {
    d = trailing(d, 5);
    if (d[0] != s->B || d[1] != s->Ho / 2 || d[2] != s->Wo / 2 || d[3] != s->Co || d[4] != nb)
      return ffi::Error::InvalidArgument(
          "dd_jax conv: g, y and index must be (B, Ho/2, Wo/2, Co, NB) as x");
  }
  if (static_cast<int64_t>(db->element_count()) != lead.count * s->Co)
    return ffi::Error::InvalidArgument("dd_jax conv: db must be (..., Co)");
  auto types = {x.element_type(), g.element_type(), y.element_type(), dw->element_type(),
                db->element_type()};
  return with_types(types, nb, [&](auto t, auto block) {
    using T = decltype(t);
    const PooledGrad<T> pooled{g.typed_data<T>(), go, y.typed_data<T>(), yo,
                               index.typed_data<int8_t>(), io, relu};
    conv_weight_grad<T, block>(pool, *s, lead.count, x.typed_data<T>(), xo, nullptr, xo,
                               dw->typed_data<T>(), &pooled);
    pooled_bias_grad<T, block>(pool, lead.count, s->B * (s->Ho / 2) * (s->Wo / 2), s->Co, pooled,
                               db->typed_data<T>());
    return ffi::Error::Success();
  });
}

// Checks the operands of a pooling gradient and runs it: `gather` reads `unpooled` into `pooled`,
// else the reverse.
ffi::Error pool_grad_call(ffi::ThreadPool& pool, ffi::AnyBuffer pooled, ffi::AnyBuffer unpooled,
                          ffi::AnyBuffer y, ffi::AnyBuffer index, bool relu, bool gather) {
  auto pd = pooled.dimensions(), ud = unpooled.dimensions();
  if (pd.size() < 5 || ud.size() != pd.size() || (pd.back() != 16 && pd.back() != 32))
    return ffi::Error::InvalidArgument("dd_jax pool: (..., B, h, w, C, 16 or 32) operands");
  const Lead lead(gather ? pd : ud, 5);
  Operand po, uo, yo, io;
  if (!lead.operand(pd, 5, po) || !lead.operand(ud, 5, uo) || !lead.operand(y.dimensions(), 5, yo) ||
      !lead.operand(index.dimensions(), 5, io) || index.element_type() != ffi::S8)
    return ffi::Error::InvalidArgument("dd_jax pool: the leading axes or the index do not match");
  auto p = trailing(pd, 5), u = trailing(ud, 5), yd = trailing(y.dimensions(), 5),
       id = trailing(index.dimensions(), 5);
  for (int a = 0; a < 5; ++a)
    if (u[a] != (a == 1 || a == 2 ? 2 : 1) * p[a] || yd[a] != p[a] || id[a] != p[a])
      return ffi::Error::InvalidArgument("dd_jax pool: unpooled must be (B, 2h, 2w, C, NB)");
  auto types = {pooled.element_type(), unpooled.element_type(), y.element_type()};
  return with_types(types, p[4], [&](auto t, auto block) {
    using T = decltype(t);
    pool_grad<T, block>(pool, lead.count, p[0], p[1], p[2], p[3],
                        pooled.typed_data<T>(), po,
                        unpooled.typed_data<T>(), uo, y.typed_data<T>(), yo,
                        index.typed_data<int8_t>(), io, relu, gather);
    return ffi::Error::Success();
  });
}

ffi::Error UnpoolImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer y,
                      ffi::AnyBuffer index, ffi::Result<ffi::AnyBuffer> dy, bool relu) {
  return pool_grad_call(pool, g, *dy, y, index, relu, false);
}

ffi::Error PoolGatherImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer y,
                          ffi::AnyBuffer index, ffi::Result<ffi::AnyBuffer> g, bool relu) {
  return pool_grad_call(pool, *g, dy, y, index, relu, true);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxConvWeightGradPooled, ConvWeightGradPooledImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // g (at the pooled output)
                                  .Arg<ffi::AnyBuffer>()  // y: the pooled, rectified output
                                  .Arg<ffi::AnyBuffer>()  // argmax index
                                  .Ret<ffi::AnyBuffer>()  // dw
                                  .Ret<ffi::AnyBuffer>()  // db
                                  .Attr<int64_t>("padding_h")
                                  .Attr<int64_t>("padding_w")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxUnpool, UnpoolImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // g (pooled)
                                  .Arg<ffi::AnyBuffer>()  // y: the pooled, rectified output
                                  .Arg<ffi::AnyBuffer>()  // argmax index
                                  .Ret<ffi::AnyBuffer>()  // dy (unpooled)
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxPoolGather, PoolGatherImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy (unpooled)
                                  .Arg<ffi::AnyBuffer>()  // y: the pooled, rectified output
                                  .Arg<ffi::AnyBuffer>()  // argmax index
                                  .Ret<ffi::AnyBuffer>()  // g (pooled)
                                  .Attr<bool>("relu"));
