import sys
from pathlib import Path

# Make tests/helpers.py importable as `helpers` in every test module, and each benchmark
# script by its name (with the sibling modules it imports, as `python benchmarks/X.py` has).
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "benchmarks"))
