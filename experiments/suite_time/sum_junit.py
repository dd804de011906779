"""Per test file: the summed test time and case count of a pytest ``--junitxml`` report.

    python experiments/suite_time/sum_junit.py report.xml [N]

Prints the total and the N (default 40) heaviest files. With xdist, each case's time is its own
worker's wall time (setup + call + teardown), so the total is about workers x wall."""

import collections
import sys
import xml.etree.ElementTree as ET


def main(path: str, top: int = 40) -> None:
    per, count = collections.Counter(), collections.Counter()
    for case in ET.parse(path).iter("testcase"):
        name = case.get("classname", "")
        module = name.split(".")[1] if name.startswith("tests.") else name
        per[module] += float(case.get("time", 0))
        count[module] += 1
    print(f"total test time {sum(per.values()):.0f} s over {sum(count.values())} cases")
    for module, seconds in per.most_common(top):
        print(f"{seconds:7.1f} s {count[module]:4d}  {module}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
