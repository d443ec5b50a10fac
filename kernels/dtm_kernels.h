// Public C ABI of libdtm_kernels (loaded from Python with ctypes).
#pragma once
#include <cstdint>

#define DTM_KERNELS_ABI_VERSION 1

extern "C" {
int dtm_kernels_abi_version(void);
}
