"""``python -m napari_medcl.serve`` runs medcl-serve (the tests start the server this way)."""

import sys

from napari_medcl.serve.cli import main

sys.exit(main())
