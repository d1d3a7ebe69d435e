// Force-included into every translation unit (setup.py): keeps the extension loadable on
// glibc 2.28 (manylinux_2_28, the tag of torch's own wheels; RHEL/Rocky 8 clusters), whatever
// glibc the build machine has. Built on Debian 12 (glibc 2.36) without it, the library needed
// dlsym@GLIBC_2.34 (dlsym moved into libc.so.6 in 2.34) and __libc_single_threaded@GLIBC_2.32
// (see sys/single_threaded.h beside this file), so auditwheel could tag it manylinux_2_34 at best.
#pragma once
#if defined(__linux__) && defined(__x86_64__) && !defined(__CUDA_ARCH__)
#include <features.h>  // defines __GLIBC__ (this header comes before any other)
#if defined(__GLIBC__)
// dlsym of glibc 2.2.5 (libdl's, kept in libc.so.6 as a compatibility version): same function.
__asm__(".symver dlsym,dlsym@GLIBC_2.2.5");
#endif
#endif
