// One gradient-descent step of a fully connected ReLU head on softmax cross-entropy, and its
// VJP, for XLA:CPU through the XLA FFI (dd_jax/dense_step.py).
//
// The head: L dense layers, a_0 = f (N, D_0), z_l = a_{l-1} W_l + b_l with W_l (D_{l-1}, D_l),
// a_l = relu(z_l) for l < L, logits z_L (N, K). The loss is the mean over the N rows of
// -sum_k Y[n, k] log softmax(z_L[n])_k (Y one-hot or any label vectors), so that
//   d_L = (softmax(z_L) s - Y) / N,  s[n] = sum_k Y[n, k],
//   d_{l-1} = (d_l W_l^T) masked where a_{l-1} > 0,  e_0 = d_1 W_1^T (the gradient at f),
// and the step returns W_l - lr a_{l-1}^T d_l, b_l - lr sum_n d_l[n] and e_0.
//   DdJaxDenseStep:    (f, Y, lr, W_1, b_1, .., W_L, b_L) -> (e_0, W_1', b_1', .., W_L', b_L')
//   DdJaxDenseStepVjp: the same inputs and the cotangents (e_0b, W_1b, b_1b, ..) ->
//                      (f_bar, Y_bar, lr_bar, W_1bar, b_1bar, ..)
// The VJP recomputes the step's activations (its residuals are its inputs). Every operand
// may have the same leading axes in front (ffi_call's vmap_method "expand_dims", e.g. over
// networks), each the output's size or 1 (shared); the items are split over XLA's intra-op
// thread pool, one item per task, each item's arithmetic in a fixed order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "common.h"

namespace {

using namespace dd_jax_native;

// Inside a kernel, a matrix of N rows (images) and D columns is held in the "lanes" layout:
// blocks of kLanes rows, each block (D, kLanes) with the block's rows innermost, the rows past
// N zero on input. Products with a kernel then broadcast its entries against whole registers
// of rows (no sums across a register's lanes), as the convolution kernels do.
template <typename T>
struct Lanes {
  using value_type = T;
  int64_t rows, cols, blocks;
  std::vector<T> v;  // (blocks, cols, kLanes)

  Lanes(int64_t rows, int64_t cols)
      : rows(rows), cols(cols), blocks((rows + kLanes<T> - 1) / kLanes<T>),
        v(blocks * cols * kLanes<T>, T(0)) {}
  T* block(int64_t b) { return v.data() + b * cols * kLanes<T>; }
  const T* block(int64_t b) const { return v.data() + b * cols * kLanes<T>; }
  T& at(int64_t r, int64_t c) { return v[(r / kLanes<T> * cols + c) * kLanes<T> + r % kLanes<T>]; }
  T at(int64_t r, int64_t c) const {
    return v[(r / kLanes<T> * cols + c) * kLanes<T> + r % kLanes<T>];
  }

  static Lanes from_rows(const T* m, int64_t rows, int64_t cols) {
    Lanes out(rows, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) out.at(r, c) = m[r * cols + c];
    return out;
  }
  void to_rows(T* m) const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) m[r * cols + c] = at(r, c);
  }
  // The rows, each zero-padded to whole registers: (rows, padded_cols()).
  int64_t padded_cols() const { return (cols + kLanes<T> - 1) / kLanes<T> * kLanes<T>; }
  std::vector<T> padded_rows() const {
    const int64_t p = padded_cols();
    std::vector<T> m(rows * p, T(0));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) m[r * p + c] = at(r, c);
    return m;
  }
};

constexpr int kTile = 8;  // accumulators per register tile

// How a product's tiles run: on the calling thread, or with a pool over the pool's threads too
// (a call of one item; with several, the items are the tasks). Each tile is one task, so the
// result does not depend on which thread runs it. Products of fewer multiply-adds than
// kParallelWork stay on the calling thread.
struct Tasks {
  ffi::ThreadPool* pool = nullptr;
  static constexpr int64_t kParallelWork = 16384;

  template <typename F>
  void run(int64_t count, int64_t work, const F& f) const {
    if (pool && work >= kParallelWork) {
      parallel_for(*pool, count, f);
    } else {
      for (int64_t t = 0; t < count; ++t) f(t);
    }
  }
};

// out (+)= x m (+ bias): x (N, k) and out (N, cols) in lanes, m (k, cols) the kernel w read
// row-major (k, cols), or with Transposed w^T for a row-major w (cols, k). With `add` onto
// out, else from `bias` (null: zero). Tiles of kTile output columns, each summing over k in
// order.
template <bool Transposed, typename T>
void product(const Tasks& tasks, const Lanes<T>& x, const T* w,
             const typename Lanes<T>::value_type* bias, bool add, Lanes<T>& out) {
  constexpr int V = kLanes<T>;
  const int64_t k = x.cols, cols = out.cols, tiles = (cols + kTile - 1) / kTile;
  tasks.run(x.blocks * tiles, k * cols, [&](int64_t task) {
    const int64_t b = task / tiles, j0 = task % tiles * kTile;
    const T* xb = x.block(b);
    T* ob = out.block(b);
    with_static<kTile>(std::min<int64_t>(kTile, cols - j0), [&](auto tile) {
      constexpr int JB = decltype(tile)::value;
      Vec<T> acc[JB];
      for (int t = 0; t < JB; ++t)
        acc[t] = add ? load(ob + (j0 + t) * V) : Vec<T>{} + (bias ? bias[j0 + t] : T(0));
      for (int64_t i = 0; i < k; ++i) {
        const Vec<T> xv = load(xb + i * V);
        for (int t = 0; t < JB; ++t)
          acc[t] += (Transposed ? w[(j0 + t) * k + i] : w[i * cols + j0 + t]) * xv;
      }
      for (int t = 0; t < JB; ++t) store(ob + (j0 + t) * V, acc[t]);
    });
  });
}

// out = base + scale (x1^T y1 + x2^T y2) (din, dout), row by row: x (N, din) in lanes, y the
// (N, dout) rows zero-padded to whole registers (`Lanes::padded_rows`); without x2 and y2,
// base + scale x1^T y1.
template <typename T>
void outer(const Tasks& tasks, const T* base, T scale, int64_t dout, T* out, const Lanes<T>& x1,
           const std::vector<T>& y1, const Lanes<T>* x2 = nullptr,
           const std::vector<T>* y2 = nullptr) {
  constexpr int V = kLanes<T>;
  constexpr int64_t kRows = 8;  // kernel rows per task
  const int64_t din = x1.cols, n = x1.rows, padded = (dout + V - 1) / V * V;
  tasks.run((din + kRows - 1) / kRows, n * din * dout, [&](int64_t task) {
    for (int64_t i = task * kRows; i < std::min(din, (task + 1) * kRows); ++i)
      for (int64_t c0 = 0; c0 < padded; c0 += kTile * V)
        with_static<kTile>(std::min<int64_t>(kTile, (padded - c0) / V), [&](auto tile) {
          constexpr int CB = decltype(tile)::value;
          Vec<T> acc[CB] = {};
          for (int64_t r = 0; r < n; ++r) {
            const T a1 = x1.at(r, i);
            const T* yr = y1.data() + r * padded + c0;
            for (int k = 0; k < CB; ++k) acc[k] += a1 * load(yr + k * V);
            if (x2) {
              const T a2 = x2->at(r, i);
              const T* y2r = y2->data() + r * padded + c0;
              for (int k = 0; k < CB; ++k) acc[k] += a2 * load(y2r + k * V);
            }
          }
          const T* from = base + i * dout + c0;
          T* to = out + i * dout + c0;
          int k = 0;
          for (; k < CB && c0 + (k + 1) * V <= dout; ++k)  // whole registers
            store(to + k * V, load(from + k * V) + scale * acc[k]);
          if (k < CB) {  // the row's last, partial register
            T sums[V];
            store(sums, acc[k]);
            for (int64_t c = k * V; c < dout - c0; ++c) to[c] = from[c] + scale * sums[c - k * V];
          }
        });
  });
}

// out = base + scale (the sum over the rows of m): m (N, D) in lanes, base and out (D,).
template <typename T>
void column_sums(const Lanes<T>& m, const T* base, T scale, T* out) {
  for (int64_t c = 0; c < m.cols; ++c) {
    Vec<T> acc{};
    for (int64_t b = 0; b < m.blocks; ++b) acc += load(m.block(b) + c * kLanes<T>);
    out[c] = base[c] + scale * lane_sum<T>(acc);
  }
}

// x where mask > 0, else 0, elementwise (the same shapes).
template <typename T>
void keep_positive(Lanes<T>& x, const Lanes<T>& mask) {
  for (size_t e = 0; e < x.v.size(); ++e) x.v[e] = mask.v[e] > 0 ? x.v[e] : T(0);
}

// The head of one item: its operands, and from `forward_backward` the activations a_0 (= f)
// .. a_{L-1}, softmax(z_L), s and the gradients d_1 .. d_L, all in lanes.
template <typename T>
struct Head {
  Tasks tasks;
  int64_t n, layers;
  std::vector<int64_t> dims;  // D_0 .. D_L
  const T* f;                 // (N, D_0)
  const T* y;                 // (N, K)
  T lr;
  std::vector<const T*> w, b;  // W_l, b_l at index l - 1
  std::vector<Lanes<T>> a, d;  // a[l], l = 0 .. L-1; d[l], l = 1 .. L (d[0] unused)
  Lanes<T> p{0, 0}, s{0, 0};   // softmax(z_L) (N, K), s (N, 1)

  // a_1 .. a_{L-1}, softmax(z_L), d_L = (softmax(z_L) s - Y) / N, then back to d_1:
  // d_{l-1} = (d_l W_l^T) where a_{l-1} > 0.
  void forward_backward() {
    const int64_t k = dims[layers];
    a.clear();
    a.push_back(Lanes<T>::from_rows(f, n, dims[0]));
    for (int64_t l = 1; l < layers; ++l) {
      a.emplace_back(n, dims[l]);
      product<false>(tasks, a[l - 1], w[l - 1], b[l - 1], false, a[l]);
      for (int64_t r = 0; r < a[l].blocks * kLanes<T>; ++r)  // the rows past N kept zero
        for (int64_t c = 0; c < dims[l]; ++c)
          a[l].at(r, c) = r < n ? std::max(a[l].at(r, c), T(0)) : T(0);
    }
    p = Lanes<T>(n, k);
    product<false>(tasks, a[layers - 1], w[layers - 1], b[layers - 1], false, p);
    const Lanes<T> targets = Lanes<T>::from_rows(y, n, k);
    s = Lanes<T>(n, 1);
    d.assign(layers + 1, Lanes<T>(0, 0));
    d[layers] = Lanes<T>(n, k);
    for (int64_t r = 0; r < n; ++r) {
      T m = p.at(r, 0), total = 0, sr = 0;
      for (int64_t c = 1; c < k; ++c) m = std::max(m, p.at(r, c));
      for (int64_t c = 0; c < k; ++c) total += (p.at(r, c) = std::exp(p.at(r, c) - m));
      for (int64_t c = 0; c < k; ++c) p.at(r, c) /= total;
      for (int64_t c = 0; c < k; ++c) sr += targets.at(r, c);
      s.at(r, 0) = sr;
      for (int64_t c = 0; c < k; ++c)
        d[layers].at(r, c) = (p.at(r, c) * sr - targets.at(r, c)) / T(n);
    }
    for (int64_t l = layers; l >= 2; --l) {
      d[l - 1] = Lanes<T>(n, dims[l - 1]);
      product<true>(tasks, d[l], w[l - 1], nullptr, false, d[l - 1]);
      keep_positive(d[l - 1], a[l - 1]);
    }
  }
};

// One step: e_0 (N, D_0) and each layer's W_l' = W_l - lr a_{l-1}^T d_l, b_l' = b_l - lr sum d_l.
template <typename T>
void head_step(Head<T>& h, T* e0, const std::vector<T*>& w_new, const std::vector<T*>& b_new) {
  h.forward_backward();
  Lanes<T> e(h.n, h.dims[0]);
  product<true>(h.tasks, h.d[1], h.w[0], nullptr, false, e);
  e.to_rows(e0);
  for (int64_t l = 1; l <= h.layers; ++l) {
    outer(h.tasks, h.w[l - 1], -h.lr, h.dims[l], w_new[l - 1], h.a[l - 1], h.d[l].padded_rows());
    column_sums(h.d[l], h.b[l - 1], -h.lr, b_new[l - 1]);
  }
}

// The cotangents of one item's step outputs and its input cotangents.
template <typename T>
struct HeadCotangents {
  const T* e0b;                  // (N, D_0)
  std::vector<const T*> wb, bb;  // W_l', b_l' cotangents
  T* f_bar;                      // (N, D_0)
  T* y_bar;                      // (N, K)
  T* lr_bar;                     // ()
  std::vector<T*> w_bar, b_bar;
};

template <typename T>
void head_vjp(Head<T>& h, const HeadCotangents<T>& c) {
  const int64_t n = h.n, L = h.layers;
  h.forward_backward();
  // The reverse of the backward pass, layer 1 up: dbar_l = ebar_{l-1} W_l - lr (a_{l-1} W_lb
  // + b_lb), ebar_l = dbar_l where a_l > 0; lr's cotangent -<W_lb, a^T d_l> - <b_lb, sum d_l>.
  std::vector<Lanes<T>> ebar, dbar(L + 1, Lanes<T>(0, 0));
  ebar.push_back(Lanes<T>::from_rows(c.e0b, n, h.dims[0]));
  T lr_bar = 0;
  for (int64_t l = 1; l <= L; ++l) {
    const int64_t dout = h.dims[l];
    Lanes<T> u(n, dout);
    product<false>(h.tasks, h.a[l - 1], c.wb[l - 1], c.bb[l - 1], false, u);
    dbar[l] = Lanes<T>(n, dout);
    product<false>(h.tasks, ebar[l - 1], h.w[l - 1], nullptr, false, dbar[l]);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t q = 0; q < dout; ++q) {
        lr_bar -= u.at(r, q) * h.d[l].at(r, q);
        dbar[l].at(r, q) -= h.lr * u.at(r, q);
      }
    if (l < L) {
      ebar.push_back(dbar[l]);
      keep_positive(ebar[l], h.a[l]);
    }
  }
  *c.lr_bar = lr_bar;
  // Softmax cross-entropy: d_L = (p s - Y) / N.
  const int64_t k = h.dims[L];
  Lanes<T> zbar(n, k);
  for (int64_t r = 0; r < n; ++r) {
    T pdb = 0;
    for (int64_t q = 0; q < k; ++q) pdb += h.p.at(r, q) * dbar[L].at(r, q);
    for (int64_t q = 0; q < k; ++q) {
      const T db = dbar[L].at(r, q);
      zbar.at(r, q) = h.s.at(r, 0) * h.p.at(r, q) * (db - pdb) / T(n);
      c.y_bar[r * k + q] = (pdb - db) / T(n);
    }
  }
  // The reverse of the forward pass, layer L down.
  for (int64_t l = L; l >= 1; --l) {
    const int64_t din = h.dims[l - 1], dout = h.dims[l];
    const std::vector<T> d_rows = h.d[l].padded_rows();
    outer(h.tasks, c.wb[l - 1], T(1), dout, c.w_bar[l - 1], h.a[l - 1], zbar.padded_rows(),
          &ebar[l - 1], &d_rows);
    column_sums(zbar, c.bb[l - 1], T(1), c.b_bar[l - 1]);
    Lanes<T> abar(n, din), scaled = h.d[l];
    product<true>(h.tasks, zbar, h.w[l - 1], nullptr, false, abar);
    for (T& v : scaled.v) v *= -h.lr;
    product<true>(h.tasks, scaled, c.wb[l - 1], nullptr, true, abar);
    if (l > 1) {
      keep_positive(abar, h.a[l - 1]);
      zbar = std::move(abar);
    } else {
      abar.to_rows(c.f_bar);
    }
  }
}

ffi::Error fail(const char* message) { return ffi::Error::InvalidArgument(message); }

// A call's items and shapes: the leading axes (from the first result, of trailing rank 2), N,
// D_0 .. D_L, the float type, and where each item's f, Y and lr start.
struct Call {
  Lead lead;
  int64_t n = 0, layers = 0;
  std::vector<int64_t> dims;
  ffi::DataType type;
  Operand f, y, lr;

  Call(ffi::Span<const int64_t> first_result, ffi::AnyBuffer f) : lead(first_result, 2),
      type(f.element_type()) {}

  // The (W, b) pair of layer l among `args` from `first`, checked to be (.., D_{l-1}, D_l) and
  // (.., D_l) (with `define`, D_l is read from W), its items' offsets into w and b.
  bool pair(ffi::RemainingArgs args, size_t first, int64_t l, bool define, Operand& w, Operand& b) {
    auto wb = args.get<ffi::AnyBuffer>(first + 2 * l), bb = args.get<ffi::AnyBuffer>(first + 2 * l + 1);
    if (wb.has_error() || bb.has_error() || wb->element_type() != type || bb->element_type() != type)
      return false;
    auto wd = wb->dimensions(), bd = bb->dimensions();
    if (wd.size() < 2 || bd.size() < 1 || wd[wd.size() - 2] != dims[l]) return false;
    if (define) dims.push_back(wd.back());
    return wd.back() == dims[l + 1] && bd.back() == dims[l + 1] && lead.operand(wd, 2, w) &&
           lead.operand(bd, 1, b);
  }

  // f (.., N, D_0), Y (.., N, K), lr (..) and the `layers` (W, b) pairs at args[0 ..].
  ffi::Error inputs(ffi::AnyBuffer fb, ffi::AnyBuffer yb, ffi::AnyBuffer lrb,
                    ffi::RemainingArgs args, int64_t count, std::vector<Operand>& w,
                    std::vector<Operand>& b) {
    if (type != ffi::F32 && type != ffi::F64) return fail("dd_jax dense: float32 or float64 only");
    auto fd = fb.dimensions();
    if (count < 1 || fd.size() < 2 || !lead.operand(fd, 2, f))
      return fail("dd_jax dense: f must be (..., N, D_0), with the results' leading axes");
    layers = count;
    n = fd[fd.size() - 2];
    dims = {fd.back()};
    w.resize(layers);
    b.resize(layers);
    for (int64_t l = 0; l < layers; ++l)
      if (!pair(args, 0, l, true, w[l], b[l]))
        return fail("dd_jax dense: layer l must be W (..., D_{l-1}, D_l) and b (..., D_l)");
    auto yd = yb.dimensions();
    if (yd.size() < 2 || yd[yd.size() - 2] != n || yd.back() != dims.back() ||
        !lead.operand(yd, 2, y) || yb.element_type() != type)
      return fail("dd_jax dense: Y must be (..., N, K), K the last layer's width");
    if (!lead.operand(lrb.dimensions(), 0, lr) || lrb.element_type() != type)
      return fail("dd_jax dense: lr must be a scalar per item");
    return ffi::Error::Success();
  }

  // Whether result `r` is (leading axes..., item dims...) of the call's type.
  bool result(ffi::RemainingRets rets, size_t r, std::initializer_list<int64_t> item) const {
    auto buffer = rets.get<ffi::AnyBuffer>(r);
    if (buffer.has_error() || (*buffer)->element_type() != type) return false;
    auto d = (*buffer)->dimensions();
    if (d.size() != lead.dims.size() + item.size()) return false;
    size_t k = 0;
    for (int64_t v : lead.dims)
      if (d[k++] != v) return false;
    for (int64_t v : item)
      if (d[k++] != v) return false;
    return true;
  }

  // Results `first`, `first` + 1, .. are the layers' (W, b) shapes.
  bool layer_results(ffi::RemainingRets rets, size_t first) const {
    for (int64_t l = 0; l < layers; ++l)
      if (!result(rets, first + 2 * l, {dims[l], dims[l + 1]}) ||
          !result(rets, first + 2 * l + 1, {dims[l + 1]}))
        return false;
    return true;
  }

  // Item `item`'s Head, its layers (W, b) at args[0 ..]; in a call of one item its products'
  // tiles are the pool's tasks (several items are a task each).
  template <typename T>
  Head<T> head(ffi::ThreadPool& pool, int64_t item, ffi::AnyBuffer fb, ffi::AnyBuffer yb,
               ffi::AnyBuffer lrb, ffi::RemainingArgs args, const std::vector<Operand>& w,
               const std::vector<Operand>& b) const {
    Head<T> h;
    if (lead.count == 1) h.tasks.pool = &pool;
    h.n = n;
    h.layers = layers;
    h.dims = dims;
    h.f = fb.typed_data<T>() + f.offsets[item];
    h.y = yb.typed_data<T>() + y.offsets[item];
    h.lr = lrb.typed_data<T>()[lr.offsets[item]];
    for (int64_t l = 0; l < layers; ++l) {
      h.w.push_back(args.get<ffi::AnyBuffer>(2 * l)->typed_data<T>() + w[l].offsets[item]);
      h.b.push_back(args.get<ffi::AnyBuffer>(2 * l + 1)->typed_data<T>() + b[l].offsets[item]);
    }
    return h;
  }

  // Item `item`'s part of result `r`, of `size` elements per item.
  template <typename T>
  static T* out(ffi::RemainingRets rets, size_t r, int64_t item, int64_t size) {
    return (*rets.get<ffi::AnyBuffer>(r))->typed_data<T>() + item * size;
  }
};

// args: W_1, b_1, .., W_L, b_L; results: e_0, W_1', b_1', ...
ffi::Error DenseStepImpl(ffi::ThreadPool pool, ffi::AnyBuffer f, ffi::AnyBuffer y,
                         ffi::AnyBuffer lr, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto e0 = rets.get<ffi::AnyBuffer>(0);
  if (e0.has_error() || args.size() % 2) return fail("dd_jax dense: (W, b) pairs and e_0 expected");
  Call c((*e0)->dimensions(), f);
  std::vector<Operand> w, b;
  if (auto err = c.inputs(f, y, lr, args, args.size() / 2, w, b); err.failure()) return err;
  if (rets.size() != args.size() + 1 || !c.result(rets, 0, {c.n, c.dims[0]}) || !c.layer_results(rets, 1))
    return fail("dd_jax dense: the results must be e_0 (..., N, D_0) and each layer's (W', b')");
  auto run = [&](auto t) {
    using T = decltype(t);
    parallel_for(pool, c.lead.count, [&](int64_t item) {
      Head<T> h = c.head<T>(pool, item, f, y, lr, args, w, b);
      std::vector<T*> w_new, b_new;
      for (int64_t l = 0; l < c.layers; ++l) {
        w_new.push_back(Call::out<T>(rets, 1 + 2 * l, item, c.dims[l] * c.dims[l + 1]));
        b_new.push_back(Call::out<T>(rets, 2 + 2 * l, item, c.dims[l + 1]));
      }
      head_step(h, Call::out<T>(rets, 0, item, c.n * c.dims[0]), w_new, b_new);
    });
    return ffi::Error::Success();
  };
  return c.type == ffi::F32 ? run(float{}) : run(double{});
}

// args: W_1, b_1, .., W_L, b_L, then the cotangents e_0b, W_1b, b_1b, .., W_Lb, b_Lb; results:
// f_bar, Y_bar, lr_bar, W_1bar, b_1bar, ...
ffi::Error DenseStepVjpImpl(ffi::ThreadPool pool, ffi::AnyBuffer f, ffi::AnyBuffer y,
                            ffi::AnyBuffer lr, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto f_bar = rets.get<ffi::AnyBuffer>(0);
  if (f_bar.has_error() || args.size() % 4 != 1)
    return fail("dd_jax dense vjp: the layers, e_0b and the layers' cotangents expected");
  Call c((*f_bar)->dimensions(), f);
  const int64_t layers = static_cast<int64_t>(args.size() / 4);
  std::vector<Operand> w, b, wb(layers), bb(layers);
  Operand e0b;
  if (auto err = c.inputs(f, y, lr, args, layers, w, b); err.failure()) return err;
  auto e = args.get<ffi::AnyBuffer>(2 * layers);
  if (e.has_error() || e->element_type() != c.type || e->dimensions().size() < 2 ||
      e->dimensions().back() != c.dims[0] || e->dimensions()[e->dimensions().size() - 2] != c.n ||
      !c.lead.operand(e->dimensions(), 2, e0b))
    return fail("dd_jax dense vjp: e_0b must be (..., N, D_0)");
  for (int64_t l = 0; l < layers; ++l)
    if (!c.pair(args, 2 * layers + 1, l, false, wb[l], bb[l]))
      return fail("dd_jax dense vjp: the layers' cotangents must have their shapes");
  if (rets.size() != 3 + 2 * static_cast<size_t>(layers) || !c.result(rets, 0, {c.n, c.dims[0]}) ||
      !c.result(rets, 1, {c.n, c.dims[layers]}) || !c.result(rets, 2, {}) || !c.layer_results(rets, 3))
    return fail("dd_jax dense vjp: the results must be f_bar, Y_bar, lr_bar and each layer's");
  auto run = [&](auto t) {
    using T = decltype(t);
    parallel_for(pool, c.lead.count, [&](int64_t item) {
      Head<T> h = c.head<T>(pool, item, f, y, lr, args, w, b);
      HeadCotangents<T> ct;
      ct.e0b = args.get<ffi::AnyBuffer>(2 * layers)->typed_data<T>() + e0b.offsets[item];
      for (int64_t l = 0; l < layers; ++l) {
        ct.wb.push_back(args.get<ffi::AnyBuffer>(2 * layers + 1 + 2 * l)->typed_data<T>() +
                        wb[l].offsets[item]);
        ct.bb.push_back(args.get<ffi::AnyBuffer>(2 * layers + 2 + 2 * l)->typed_data<T>() +
                        bb[l].offsets[item]);
        ct.w_bar.push_back(Call::out<T>(rets, 3 + 2 * l, item, c.dims[l] * c.dims[l + 1]));
        ct.b_bar.push_back(Call::out<T>(rets, 4 + 2 * l, item, c.dims[l + 1]));
      }
      ct.f_bar = Call::out<T>(rets, 0, item, c.n * c.dims[0]);
      ct.y_bar = Call::out<T>(rets, 1, item, c.n * c.dims[layers]);
      ct.lr_bar = Call::out<T>(rets, 2, item, 1);
      head_vjp(h, ct);
    });
    return ffi::Error::Success();
  };
  return c.type == ffi::F32 ? run(float{}) : run(double{});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxDenseStep, DenseStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // f
                                  .Arg<ffi::AnyBuffer>()  // Y
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .RemainingArgs()        // W_1, b_1, .., W_L, b_L
                                  .RemainingRets());      // e_0, W_1', b_1', ..

XLA_FFI_DEFINE_HANDLER_SYMBOL(DdJaxDenseStepVjp, DenseStepVjpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // f
                                  .Arg<ffi::AnyBuffer>()  // Y
                                  .Arg<ffi::AnyBuffer>()  // lr
                                  .RemainingArgs()        // layers, e_0b, their cotangents
                                  .RemainingRets());      // f_bar, Y_bar, lr_bar, W_1bar, ..
