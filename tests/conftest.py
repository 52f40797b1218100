"""Shared test setup: tests import helpers from this folder (tiny_models)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
