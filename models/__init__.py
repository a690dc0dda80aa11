"""Model architectures, training, evaluation and ONNX export (see docs/models.md).

Torch makes its compile-cache directory (``$TMPDIR/torchinductor_<user>``) the
first time an optimizer step imports ``torch._dynamo``, although nothing here
compiles. In a checkout, unless the caller chose a place
(``TORCHINDUCTOR_CACHE_DIR``), that directory goes under the checkout's
``.cache/`` instead, so that training leaves nothing in the temporary directory.
"""

import os
import pathlib

_CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file():
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CHECKOUT / ".cache" / "torchinductor"))
