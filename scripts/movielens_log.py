"""Write the shared MovieLens set as one CSV log in specs/movielens.yaml's layout.

    python scripts/movielens_log.py [MOVIELENS_DIR] [OUT_CSV]
    odl eval --spec specs/movielens.yaml --log OUT_CSV
"""
from __future__ import annotations

import sys
from pathlib import Path

from odl.config import Config
from pipeline.movielens import write_log

if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Config().source.movielens_dir
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("var/movielens-log.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{write_log(src, out):,} ratings -> {out}")
