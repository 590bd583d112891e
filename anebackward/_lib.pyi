# Type stub of the cffi extension module built from csrc/ by ffibuild.py.
# Its functions are the declarations of csrc/anebackward.h (ab_*), called
# through anebackward._native; cffi gives them no static signatures.
from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
