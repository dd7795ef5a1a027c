"""Where the repository is: the default homes of data, workdirs and suites."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
