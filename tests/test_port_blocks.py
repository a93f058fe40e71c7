"""Each multi-process test owns a 1000-port block for its rendezvous (base + pid % 1000).

Two tests on one block collide inside one pytest process: a store left listening by one
test is joined by the other's ranks, which then wait forever (a hang, not an error).
"""

import re
from pathlib import Path

TESTS = Path(__file__).parent


def test_rendezvous_port_blocks_do_not_overlap():
    bases: list[tuple[int, str]] = []
    for path in sorted(TESTS.glob("test_*.py")):
        text = path.read_text()
        for m in re.finditer(r"port_base=(\d+)", text):
            bases.append((int(m.group(1)), path.name))
        for m in re.finditer(r"str\((\d+) \+ os\.getpid\(\) % 1000\)", text):
            bases.append((int(m.group(1)), path.name))
    assert len(bases) >= 5  # the distributed tests are all found
    bases.sort()
    for (a, fa), (b, fb) in zip(bases, bases[1:]):
        assert b - a >= 1000 or (fa == fb and b == a), f"{fa} ({a}) and {fb} ({b}) share ports"
