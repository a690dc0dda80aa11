import sys

from services.coder.app import main

sys.exit(main())
