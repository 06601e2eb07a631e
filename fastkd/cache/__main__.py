import sys

from fastkd.cache.build import main

sys.exit(main())
