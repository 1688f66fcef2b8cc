"""``python -m sbsampler.compare SCRIPT [options]`` (``sbsampler.compare.cli``)."""

import sys

from .cli import main

sys.exit(main())
