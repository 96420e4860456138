import sys

from glm_ext.cli import main

sys.exit(main())
