// Portability macros shared by the host (g++) and device (nvcc) builds.
//
// Every header under include/hart_fast/ is compiled twice: once by the host
// compiler for the CPU kernels and the C++ tests, once by nvcc for the CUDA
// kernels.  Marking the per-element math HF_HOST_DEVICE lets both builds run
// literally the same arithmetic, so the CPU test suite (which runs everywhere)
// also vouches for the numerics of the GPU kernels.
//
// These headers must not include torch headers: a .cu file that pulls in
// torch takes ~40 s to compile, one that does not takes ~2 s.
#pragma once

#if defined(__CUDACC__)
#define HF_HOST_DEVICE __host__ __device__
#else
#define HF_HOST_DEVICE
#endif
