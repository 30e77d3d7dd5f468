"""``python -m chimera_vllm.cli``: the same as the ``chimera-vllm`` command."""

import sys

from chimera_vllm.cli import main

sys.exit(main())
