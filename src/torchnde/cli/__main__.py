"""``python -m torchnde.cli``: the same as the ``torchnde`` command."""

import sys

from . import main

sys.exit(main())
