import sys

from fastkd.train.trainer import main

sys.exit(main())
