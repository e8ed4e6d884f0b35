// Device guard of the CUDA op bindings (*_cuda.cpp).
//
// The dispatcher picks an op's CUDA kernel when any argument is a CUDA tensor,
// so the tensor a binding guards on may still be on the CPU (a direct
// torch.ops.hart_fast.* call with mixed devices).  Constructing a CUDAGuard
// on a CPU device fails with an internal message; this says what is wrong
// instead, as the argument checks do for the other tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

namespace hart_fast::ops {

// Makes `t`'s device current for the scope of the returned guard.
inline c10::cuda::CUDAGuard cuda_device_guard(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": expected ", name,
                    " on a CUDA device like the other arguments, but got ", name, " on ",
                    t.device(), ".");
  return c10::cuda::CUDAGuard(t.device());  // guaranteed copy elision (C++17)
}

}  // namespace hart_fast::ops
