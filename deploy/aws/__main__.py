import sys

from deploy.aws.cli import main

if __name__ == "__main__":
    sys.exit(main())
