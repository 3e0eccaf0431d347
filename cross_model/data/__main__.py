"""`python -m cross_model.data check CONFIG`: one row of every task of a config, with its source."""

import sys

from cross_model.data.check import main

sys.exit(main())
