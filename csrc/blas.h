/* blas.h — the one place that decides which BLAS the kernels call.
 *
 * macOS: Accelerate (new LAPACK/BLAS interface).
 * Elsewhere: OpenBLAS from the scipy-openblas32 wheel, whose symbols carry a
 * `scipy_` prefix (scipy_cblas_sgemm). Kernels call AB_SGEMM and never name
 * a vendor symbol themselves.
 */
#ifndef AB_BLAS_H
#define AB_BLAS_H

#if defined(__APPLE__)
#  ifndef ACCELERATE_NEW_LAPACK
#    define ACCELERATE_NEW_LAPACK
#  endif
#  include <Accelerate/Accelerate.h>
#  define AB_BLAS_NAME "Accelerate"
#  define AB_SGEMM cblas_sgemm
typedef int ab_blasint;
#  define AB_BLAS_INT_MAX 2147483647LL
#else
#  include <cblas.h>              /* scipy_openblas32/include */
#  define AB_BLAS_NAME "OpenBLAS (scipy-openblas32)"
#  define AB_SGEMM scipy_cblas_sgemm
#  define AB_BLAS_HAVE_OPENBLAS_CONTROLS 1
typedef blasint ab_blasint;
#  define AB_BLAS_INT_MAX 2147483647LL
#endif

#endif
