import sys

from services.model_server.app import main

sys.exit(main())
