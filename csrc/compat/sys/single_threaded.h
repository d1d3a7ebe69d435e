// Shadows glibc's <sys/single_threaded.h> (csrc/compat is first on the include path; see
// ../glibc_2_28.h). libstdc++'s reference counting reads glibc 2.32's __libc_single_threaded to
// skip atomics in single-threaded processes; reading it would make the extension need glibc
// >= 2.32. Here the answer is always "maybe multi-threaded": the atomics are always used, which
// is what older glibc builds of libstdc++ do anyway.
#pragma once
#define __libc_single_threaded protokernels_libc_single_threaded
inline constexpr char protokernels_libc_single_threaded = 0;
