import sys

from bigtrain.cli import main

# The guard matters: `bigtrain data prepare` starts datatrove workers with forkserver, which
# re-imports the main module in each worker.
if __name__ == "__main__":
    sys.exit(main())
