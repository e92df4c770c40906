// Host-side FFI helpers shared by the CPU and CUDA handlers: dtype codes of XLA
// buffers, the error the handlers return, and reading and checking one leaf's
// operand and result buffers.
#ifndef LARS_NATIVE_FFI_LEAF_H_
#define LARS_NATIVE_FFI_LEAF_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lars_common.h"
#include "xla/ffi/api/ffi.h"

namespace lars_native {

inline Dtype ToDtype(xla::ffi::DataType t) {
  switch (t) {
    case xla::ffi::DataType::F32:
      return kF32;
    case xla::ffi::DataType::F64:
      return kF64;
    case xla::ffi::DataType::BF16:
      return kBF16;
    case xla::ffi::DataType::F16:
      return kF16;
    default:
      return kBadDtype;
  }
}

inline xla::ffi::Error Invalid(const std::string& message) {
  return xla::ffi::Error(xla::ffi::ErrorCode::kInvalidArgument, "lars native step: " + message);
}

// Invalid, naming leaf i. The message is built only on failure: a step reads
// every leaf on every call, and a string per leaf was a heap allocation per
// leaf on the success path.
inline xla::ffi::Error LeafInvalid(size_t i, const char* what) {
  return Invalid("leaf " + std::to_string(i) + ": " + what);
}

// Binds, after a handler's contexts, what every step handler takes in this
// order: the learning rate, the leaves' operands and results, and the step's
// attributes (ffi.py passes them by name).
template <typename Binding>
auto BindStep(Binding&& binding) {
  return std::forward<Binding>(binding)
      .template Arg<xla::ffi::AnyBuffer>()  // learning rate
      .RemainingArgs()                      // params, grads, momentum
      .RemainingRets()                      // out, momentum, trust ratios
      .template Attr<double>("momentum")
      .template Attr<double>("weight_decay")
      .template Attr<double>("trust_coefficient")
      .template Attr<double>("eps")
      .template Attr<double>("trust_clip")
      .template Attr<double>("grad_clip_norm")
      .template Attr<double>("grad_clip_value")
      .template Attr<bool>("nesterov")
      .template Attr<bool>("lr_inside_momentum")
      .template Attr<int32_t>("mode")
      .template Attr<xla::ffi::Span<const uint8_t>>("decay_mask")
      .template Attr<xla::ffi::Span<const uint8_t>>("trust_mask")
      .template Attr<int64_t>("num_threads")
      .template Attr<xla::ffi::Span<const int64_t>>("fused");  // CUDA: FusedKernel's
}

// The optional operands after the leaves' buffers.
struct StepExtras {
  bool finite_flag = false;   // a scalar: all gradients are finite (else skip the step)
  bool given_ratios = false;  // the trust ratios and global norm, computed by the caller
  size_t first = 0;           // index of the first optional operand
};

// Checks what every step handler receives (mask lengths, output mode, operand
// and result counts, the learning rate) and fills the static hyperparameters.
// `*outs` is the number of updates/params results: 0 or num_leaves.
inline xla::ffi::Error ReadStepHeader(const xla::ffi::AnyBuffer& lr,
                                      const xla::ffi::RemainingArgs& args,
                                      const xla::ffi::RemainingRets& rets, size_t num_leaves,
                                      size_t trust_mask_size, double momentum,
                                      double weight_decay, double trust_coefficient, double eps,
                                      double trust_clip, double grad_clip_norm,
                                      double grad_clip_value, bool nesterov,
                                      bool lr_inside_momentum, int32_t mode, Hyper* h,
                                      size_t* outs, StepExtras* extras) {
  if (trust_mask_size != num_leaves) return Invalid("mask lengths differ");
  if (mode != kWriteUpdates && mode != kWriteParams && mode != kMomentumOnly) {
    return Invalid("unknown output mode " + std::to_string(mode));
  }
  // Results: [out per leaf,] momentum per leaf, then one float32 vector of
  // the trust ratios (one per leaf: a vector, not a scalar per leaf, so that
  // XLA need not stack them into the optimizer state with a launch of its own).
  // Operands: params, grads, momentum per leaf; then optionally a flag "all
  // gradients are finite" (skip_nonfinite); then, when the caller has computed
  // the trust ratios (sharded params: the norms are sums over shards), the
  // ratios (one per leaf) and the global gradient norm.
  *outs = mode == kMomentumOnly ? 0 : num_leaves;
  const size_t extra = args.size() >= 3 * num_leaves ? args.size() - 3 * num_leaves : 99;
  extras->finite_flag = extra == 1 || extra == 3;
  extras->given_ratios = extra == 2 || extra == 3;
  extras->first = 3 * num_leaves;
  if (extra > 3 || rets.size() != *outs + num_leaves + 1) {
    return Invalid(mode == kMomentumOnly
                       ? "expected 3 operands per leaf; 1 result per leaf and the ratio vector"
                       : "expected 3 operands per leaf; 2 results per leaf and the ratio vector");
  }
  if (lr.element_count() != 1 || lr.element_type() != xla::ffi::DataType::F32) {
    return Invalid("the learning rate must be a float32 scalar");
  }
  h->momentum = momentum;
  h->weight_decay = weight_decay;
  h->trust_coefficient = trust_coefficient;
  h->eps = eps;
  h->has_trust_clip = trust_clip > 0.0;
  h->trust_clip = trust_clip;
  h->has_clip_norm = grad_clip_norm > 0.0;
  h->grad_clip_norm = grad_clip_norm;
  h->has_clip_value = grad_clip_value > 0.0;
  h->grad_clip_value = grad_clip_value;
  h->nesterov = nesterov;
  h->lr_inside = lr_inside_momentum;
  h->mode = mode;
  return xla::ffi::Error::Success();
}

// One leaf's buffers, read off the handler's operands and results.
struct LeafBuffers {
  int64_t n = 0;
  Dtype p = kF32;   // params (and updates / new params)
  Dtype gt = kF32;  // gradients
  const void* w = nullptr;
  const void* g = nullptr;
  const void* v = nullptr;
  void* out = nullptr;  // updates or new params; null when the step writes neither
  void* v_out = nullptr;
  float* ratio_out = nullptr;
};

// Reads leaf i of num_leaves. Operands are params, grads, momentum (num_leaves
// each); results are `outs` updates/params (0 or num_leaves), then momentum,
// then the float32 vector of the trust ratios. Checks dtypes and sizes; on failure
// returns an Invalid error naming the leaf.
inline xla::ffi::Error ReadLeafBuffers(const xla::ffi::RemainingArgs& args,
                                       const xla::ffi::RemainingRets& rets, size_t num_leaves,
                                       size_t outs, size_t i, LeafBuffers* leaf) {
  namespace ffi = xla::ffi;
  auto w = args.get<ffi::AnyBuffer>(i);
  auto g = args.get<ffi::AnyBuffer>(num_leaves + i);
  auto v = args.get<ffi::AnyBuffer>(2 * num_leaves + i);
  auto v_out = rets.get<ffi::AnyBuffer>(outs + i);
  auto r_out = rets.get<ffi::AnyBuffer>(outs + num_leaves);
  auto out = outs ? rets.get<ffi::AnyBuffer>(i) : v_out;  // out is unused without outs
  if (!w.has_value() || !g.has_value() || !v.has_value() || !out.has_value() ||
      !v_out.has_value() || !r_out.has_value()) {
    return Invalid("an operand or result is not a buffer");
  }
  leaf->n = static_cast<int64_t>(w->element_count());
  leaf->p = ToDtype(w->element_type());
  leaf->gt = ToDtype(g->element_type());
  const Dtype vt = ToDtype(v->element_type());
  if (!SupportedPair(leaf->p, leaf->gt)) return LeafInvalid(i, "unsupported params/grads dtypes");
  if (vt != (leaf->p == kF64 ? kF64 : kF32)) {
    return LeafInvalid(i, "momentum must be float32 (float64 for float64 params)");
  }
  if (static_cast<int64_t>(g->element_count()) != leaf->n ||
      static_cast<int64_t>(v->element_count()) != leaf->n ||
      static_cast<int64_t>((*out)->element_count()) != leaf->n ||
      static_cast<int64_t>((*v_out)->element_count()) != leaf->n) {
    return LeafInvalid(i, "params, grads, momentum and results differ in size");
  }
  if ((outs && ToDtype((*out)->element_type()) != leaf->p) ||
      ToDtype((*v_out)->element_type()) != vt) {
    return LeafInvalid(i, "result dtypes differ from the params/momentum dtypes");
  }
  if ((*r_out)->element_type() != ffi::DataType::F32 ||
      (*r_out)->element_count() != num_leaves) {
    return Invalid("the trust-ratio result must be a float32 vector of one ratio per leaf");
  }
  leaf->w = w->untyped_data();
  leaf->g = g->untyped_data();
  leaf->v = v->untyped_data();
  leaf->out = outs ? (*out)->untyped_data() : nullptr;
  leaf->v_out = (*v_out)->untyped_data();
  leaf->ratio_out = static_cast<float*>((*r_out)->untyped_data()) + i;
  return ffi::Error::Success();
}

// Reads the "all gradients are finite" flag (a bool or integer scalar at
// operand `index`) into `*finite`. Host memory: CPU handlers only.
inline xla::ffi::Error ReadFiniteFlag(const xla::ffi::RemainingArgs& args, size_t index,
                                      bool* finite) {
  namespace ffi = xla::ffi;
  auto flag = args.get<ffi::AnyBuffer>(index);
  if (!flag.has_value() || flag->element_count() != 1) {
    return Invalid("the finite flag must be a scalar");
  }
  switch (flag->element_type()) {
    case ffi::DataType::PRED:
    case ffi::DataType::U8:
    case ffi::DataType::S8:
      *finite = *static_cast<const uint8_t*>(flag->untyped_data()) != 0;
      return ffi::Error::Success();
    case ffi::DataType::S32:
      *finite = *static_cast<const int32_t*>(flag->untyped_data()) != 0;
      return ffi::Error::Success();
    default:
      return Invalid("the finite flag must be a bool or integer scalar");
  }
}

// Reads the caller's trust ratios and global gradient norm (operands `index`
// and `index + 1`, float32 or float64) into `ratios` (one per leaf) and
// `*global_norm`.
inline xla::ffi::Error ReadGivenRatios(const xla::ffi::RemainingArgs& args, size_t index,
                                       size_t num_leaves, std::vector<double>* ratios,
                                       double* global_norm) {
  namespace ffi = xla::ffi;
  auto r = args.get<ffi::AnyBuffer>(index);
  auto norm = args.get<ffi::AnyBuffer>(index + 1);
  if (!r.has_value() || !norm.has_value()) return Invalid("the given ratios are not buffers");
  const ffi::DataType t = r->element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::F64) || norm->element_type() != t) {
    return Invalid("the given ratios and global norm must both be float32 or float64");
  }
  if (r->element_count() != num_leaves || norm->element_count() != 1) {
    return Invalid("expected one given ratio per leaf and a scalar global norm");
  }
  ratios->resize(num_leaves);
  for (size_t i = 0; i < num_leaves; ++i) {
    (*ratios)[i] = t == ffi::DataType::F32 ? static_cast<const float*>(r->untyped_data())[i]
                                           : static_cast<const double*>(r->untyped_data())[i];
  }
  *global_norm = t == ffi::DataType::F32 ? *static_cast<const float*>(norm->untyped_data())
                                         : *static_cast<const double*>(norm->untyped_data());
  return ffi::Error::Success();
}

}  // namespace lars_native

#endif  // LARS_NATIVE_FFI_LEAF_H_
