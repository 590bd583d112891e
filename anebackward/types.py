"""Type aliases of the public API (for annotations; nothing here runs)."""
from typing import Literal, Optional, Sequence, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

#: a float32, C-contiguous array (the package never converts float buffers)
F32Array = NDArray[np.float32]
#: token ids: any integer array (int32 is used as is; others are converted)
Tokens = ArrayLike
#: backend=: "cpu" (default), "auto", "reference", "ane"; None: ANEBACKWARD_BACKEND or "cpu"
Backend = Optional[Literal["auto", "cpu", "reference", "ane"]]
#: one float32 array or several (clip_grad_norm, grad_norm)
Grads = Union[F32Array, Sequence[F32Array]]

__all__ = ["F32Array", "Tokens", "Backend", "Grads"]
