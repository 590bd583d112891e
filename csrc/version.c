/* version.c — the package version, compiled in from anebackward/_version.py
 * (ffibuild.py passes it as AB_VERSION), so C and Python report the same. */
#include "anebackward.h"

#ifndef AB_VERSION
#error "AB_VERSION must be defined by the build (ffibuild.py reads anebackward/_version.py)"
#endif

const char *ab_version(void) { return AB_VERSION; }
