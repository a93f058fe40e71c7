import sys
from pathlib import Path

# Make tests/helpers.py importable as `helpers` in every test module, and each benchmark
# script by its name, with the shared helpers in benchmarks/common/ (as the scripts import them).
sys.path.insert(0, str(Path(__file__).parent))
for i, folder in enumerate(("common", "cpu", "gpu", "diagnostics"), start=1):
    sys.path.insert(i, str(Path(__file__).parent.parent / "benchmarks" / folder))
