"""tools/puzzles.py: print generated Knights-and-Knaves puzzles with their solutions and statement structures.

    python tools/puzzles.py 3 [COUNT]     # COUNT (default 1) puzzles with 3 people, seeds 0..COUNT-1
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tools/puzzles.py N_PEOPLE [COUNT]")
    for i in range(int(sys.argv[2]) if len(sys.argv) > 2 else 1):
        record = data.make_kk_puzzle(int(sys.argv[1]), random.Random(i))
        print(record["quiz"], "\n", record["solution_text_format"], "\n", record["statements"], "\n", sep="")
